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
  ``Retry`` schedules another round (state ``unknown``). Spending the retry budget
  raises the alarm once (``Stalled``: ``CaptureFailed`` → NEEDS_RECONCILIATION) but does
  not end automatic handling: the row keeps being looked up, with a backoff capped at
  ``RetryPolicy.stalled_max_s``, until the gateway's answer settles it (a capture →
  ``Captured``; proof that no money was taken → ``CaptureDeclined``, which releases the
  stock and voids). ``CaptureFailed`` is emitted at most once per transaction. The rule
  is the runtime's, shared with refunds (``services.runtime.retry.retry_later``);
- a capture is ``Captured`` only for the amount and currency of the claim: any other
  capture found by a look-up fails to reconciliation (``amount_mismatch``);
- authorization expiry is decided here too: the capture service's worker (its
  janitor) is the only owner of expiry, so an authorization can never be both
  captured and expired. Only an authorization whose capture was never sent (a
  ``pending`` row) is expired once older than the hold. Once a capture may have been
  sent, a look-up that still shows ``authorized`` re-sends it under the same key (the
  gateway answers the first result again): the first call may still land late, and an
  expiry would then void/release what was captured. The gateway's own expiry (a
  ``voided`` authorization, a declined capture) settles such a row instead.

Known limitation: the hold is counted from the StockReserved event's ``occurred_at``
(see ``decide_stock_reserved``), not from the authorization's own time, which the
saga events do not carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from services.runtime import retry
from services.runtime.retry import (
    Call,
    Failed,
    GatewayOutcome,
    Lookup,
    Retry,
    RetryPolicy,
    Stalled,
)

__all__ = [
    "Call",
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
    "Stalled",
    "after_capture",
    "after_lookup",
    "capture_key",
    "decide_stock_reserved",
    "first_step",
    "not_found",
    "retry_later",
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
class Captured:
    capture_id: str


@dataclass(frozen=True, slots=True)
class CaptureDeclined:
    decline_code: str


@dataclass(frozen=True, slots=True)
class Expired:
    pass


Resolution = Captured | CaptureDeclined | Expired | Failed | Retry | Stalled


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
    ``attempt`` is this round's number, 1-based; ``alerted`` tells whether the alarm
    (``CaptureFailed``) was raised for it already."""

    transaction_id: str
    amount: int
    currency: str
    prior_state: CaptureState
    attempt: int
    authorized_at: datetime
    alerted: bool = False


def _expired(claim: Claim, now: datetime, policy: CapturePolicy) -> bool:
    return now >= claim.authorized_at + policy.hold


def first_step(claim: Claim, now: datetime, policy: CapturePolicy) -> Lookup | Call | Expired:
    if claim.prior_state != "pending":
        return Lookup()  # a call may have reached the gateway: find out before anything
    return Expired() if _expired(claim, now, policy) else Call()


def retry_later(
    claim: Claim, error: str, now: datetime, policy: CapturePolicy, jitter: float
) -> Retry | Stalled:
    """Another round (it starts with a look-up); past the budget, the alarm once and
    capped look-ups (``services.runtime.retry.retry_later``)."""
    return retry.retry_later(claim, error, now, policy.retry, jitter)


def not_found() -> CaptureDeclined:
    """The gateway does not know the transaction: nothing was captured on it, so the
    stock is released (and the void attempted) as for a declined capture."""
    return CaptureDeclined("transaction_not_found")


def _captured(claim: Claim, captures: object) -> Captured | Failed | None:
    """The capture a look-up shows: ``Captured`` only for one capture of the claim's
    amount and currency; any other capture is ``amount_mismatch``; None if none."""
    if not isinstance(captures, list) or not captures:
        return None
    last = captures[-1]
    if not (
        isinstance(last, dict) and isinstance(last.get("capture_id"), str) and last["capture_id"]
    ):
        return None
    if (
        len(captures) == 1
        and last.get("amount") == claim.amount
        and last.get("currency") == claim.currency
    ):
        return Captured(last["capture_id"])
    return Failed("amount_mismatch")


def after_lookup(claim: Claim, payment: Mapping[str, Any]) -> Call | Resolution:
    """Interpret ``GET /v1/payments/{id}`` (only rows whose capture may have been sent
    are looked up): a recorded capture of the claim's amount settles it; a payment still
    authorized is captured again under the same key — never expired, since the first
    call may still land; a voided one had no money taken."""
    captured = _captured(claim, payment.get("captures"))
    if captured is not None:
        return captured
    state = payment.get("state")
    if state == "authorized":
        return Call()
    if state == "voided":
        return CaptureDeclined("authorization_voided")
    return Failed("unexpected_payment_state")


def after_capture(
    claim: Claim, outcome: GatewayOutcome, now: datetime, policy: CapturePolicy, jitter: float
) -> Resolution:
    if outcome.kind == "succeeded":
        capture_id = outcome.body.get("capture_id")
        if isinstance(capture_id, str) and capture_id:
            return Captured(capture_id)
        # captured, but we cannot name the capture: the look-up next round will
        return retry_later(claim, "capture_id_missing", now, policy, jitter)
    if outcome.kind == "declined":
        return CaptureDeclined(outcome.code or "declined")
    if outcome.kind == "not_found":
        return not_found()
    return retry_later(claim, outcome.reason or "unknown", now, policy, jitter)
