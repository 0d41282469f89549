"""Pure decisions of the capture service.

Guarantees: no I/O, no clock, no randomness (callers pass ``now`` and ``jitter``).

A capture intent goes through rounds. Each round the worker asks ``first_step``, maybe
looks the payment up (``after_lookup``), maybe calls capture (``after_capture``), and
stores the resolution:

- a payment whose last call may have reached the gateway (state ``unknown``, or an
  ``in_flight`` row reclaimed after its lease) is always looked up before anything
  else is done to it; a capture is only ever repeated with the same idempotency key
  ``capture:{transaction_id}``, never under a new one;
- ``captured`` / ``declined`` / ``expired`` / ``failed`` are final and emit one event;
  ``Retry`` schedules another round (state ``unknown``) until the budget is spent,
  then the intent fails (``CaptureFailed`` → NEEDS_RECONCILIATION);
- authorization expiry is decided here too: the capture service's worker (its
  janitor) is the only owner of expiry, so an authorization can never be both
  captured and expired. An authorization older than the hold is expired — if it was
  ever sent to the gateway, only after a look-up shows it is still uncaptured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from services.runtime.gateway_client import GatewayOutcome
from services.runtime.intents import Failed, Retry, RetryPolicy, retry_or_fail

__all__ = [
    "CallCapture",
    "CaptureDeclined",
    "CapturePolicy",
    "CaptureState",
    "Captured",
    "Claim",
    "Expired",
    "Failed",
    "Lookup",
    "NewCapture",
    "Resolution",
    "Retry",
    "RetryPolicy",
    "after_capture",
    "after_lookup",
    "capture_key",
    "decide_stock_reserved",
    "first_step",
    "retry_or_fail",
]

CaptureState = Literal[
    "pending", "in_flight", "unknown", "captured", "declined", "expired", "failed",
    "sale_confirmed",
]  # fmt: skip
FINAL_STATES: frozenset[CaptureState] = frozenset(
    {"captured", "declined", "expired", "failed", "sale_confirmed"}
)


def capture_key(transaction_id: str) -> str:
    """The one idempotency key of a transaction's capture, for its whole life."""
    return f"capture:{transaction_id}"


@dataclass(frozen=True, slots=True)
class CapturePolicy:
    hold: timedelta
    retry: RetryPolicy


# --- steps and resolutions ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """Ask the gateway for the payment before doing anything to it."""


@dataclass(frozen=True, slots=True)
class CallCapture:
    """Capture with the transaction's one idempotency key."""


@dataclass(frozen=True, slots=True)
class Captured:
    capture_id: str


@dataclass(frozen=True, slots=True)
class CaptureDeclined:
    decline_code: str


@dataclass(frozen=True, slots=True)
class Expired:
    pass


Resolution = Captured | CaptureDeclined | Expired | Failed | Retry


# --- recording the intent ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewCapture:
    state: CaptureState
    idempotency_key: str
    authorized_at: datetime
    next_attempt_at: datetime | None


def decide_stock_reserved(
    flow: Literal["authorization", "sale"],
    transaction_id: str,
    occurred_at: datetime | None,
    now: datetime,
) -> NewCapture:
    """A sale was charged by the gateway already: it is confirmed at once, no call. An
    authorization becomes a ``pending`` intent, due now.

    ``authorized_at`` is the earliest time paysaga knows of for the authorization: the
    StockReserved event's ``occurred_at`` (after the authorization, so the hold counts
    a little late — the default hold of 6 days keeps a day's margin under the common
    7-day authorization window), never later than ``now``.
    """
    authorized_at = min(occurred_at, now) if occurred_at is not None else now
    if flow == "sale":
        return NewCapture("sale_confirmed", capture_key(transaction_id), authorized_at, None)
    return NewCapture("pending", capture_key(transaction_id), authorized_at, now)


# --- one round -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """An intent claimed for one round. ``prior_state`` is its state before the claim
    (``pending``, ``unknown``, or ``in_flight`` when a crashed worker's lease ran out);
    ``attempt`` is this round's number, 1-based."""

    transaction_id: str
    amount: int
    currency: str
    prior_state: CaptureState
    attempt: int
    authorized_at: datetime


def _expired(claim: Claim, now: datetime, policy: CapturePolicy) -> bool:
    return now >= claim.authorized_at + policy.hold


def first_step(
    claim: Claim, now: datetime, policy: CapturePolicy
) -> Lookup | CallCapture | Expired:
    if claim.prior_state != "pending":
        return Lookup()  # a call may have reached the gateway: find out before anything
    return Expired() if _expired(claim, now, policy) else CallCapture()


def after_lookup(
    claim: Claim, payment: Mapping[str, Any], now: datetime, policy: CapturePolicy
) -> CallCapture | Resolution:
    """Interpret ``GET /v1/payments/{id}``: a recorded capture settles it; a payment
    still authorized is captured again (same key) or, past the hold, expired."""
    captures = payment.get("captures") or []
    last = captures[-1] if isinstance(captures, list) and captures else None
    if isinstance(last, dict) and isinstance(last.get("capture_id"), str) and last["capture_id"]:
        return Captured(last["capture_id"])
    state = payment.get("state")
    if state == "authorized":
        return Expired() if _expired(claim, now, policy) else CallCapture()
    if state == "voided":
        return Failed("authorization_voided")
    return Failed("unexpected_payment_state")


def after_capture(
    claim: Claim, outcome: GatewayOutcome, now: datetime, policy: CapturePolicy, jitter: float
) -> Resolution:
    if outcome.kind == "succeeded":
        capture_id = outcome.body.get("capture_id")
        if isinstance(capture_id, str) and capture_id:
            return Captured(capture_id)
        # captured, but we cannot name the capture: the look-up next round will
        return retry_or_fail(claim.attempt, "capture_id_missing", now, policy.retry, jitter)
    if outcome.kind == "declined":
        return CaptureDeclined(outcome.code or "declined")
    if outcome.kind == "not_found":
        return Failed("transaction_not_found")
    return retry_or_fail(claim.attempt, outcome.reason or "unknown", now, policy.retry, jitter)
