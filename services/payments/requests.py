"""Pure decisions of the payment request (docs/contract.md §3.7): an order or retry that came
without a ``payment_intent_id`` has its payment created at the gateway by paysaga.

Guarantees: no I/O, no clock, no randomness. An attempt has at most one request, under
one idempotency key for its whole life (``intent:{order_id}:{attempt}``), so the gateway
creates at most one payment per attempt whatever crashes or times out. Every round
sends that same request again: the gateway answers a replayed key with its first result,
which is how an unknown outcome (a lost answer, a worker killed after the call) is
settled — a look-up by id (``GET /v1/payment_intents/{id}``) would need the id that the
lost answer carried. Backoff is the runtime's (``RetryPolicy.delay_s``);
``retry_or_fail`` below is this service's end rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from services.runtime.retry import Failed, GatewayOutcome, Retry, RetryPolicy

__all__ = [
    "Claim",
    "Failed",
    "Refused",
    "RequestState",
    "Requested",
    "Resolution",
    "Retry",
    "after_call",
    "request_key",
    "retry_or_fail",
]

RequestState = Literal["pending", "in_flight", "unknown", "requested", "refused", "failed"]


def request_key(order_id: str, attempt: int) -> str:
    return f"intent:{order_id}:{attempt}"


@dataclass(frozen=True, slots=True)
class Claim:
    """A payment request claimed for one round (``round`` is 1-based)."""

    order_id: str
    attempt: int
    amount: int
    currency: str
    payment_method: str
    round: int


@dataclass(frozen=True, slots=True)
class Requested:
    """The gateway created the payment. ``client_secret`` is only carried to the one
    event that needs it (PaymentRequested) and is never stored with the request."""

    payment_intent_id: str
    client_secret: str
    expires_at: str | None

    def __repr__(self) -> str:  # log lines show resolutions: never the secret
        return f"Requested(payment_intent_id={self.payment_intent_id!r})"


@dataclass(frozen=True, slots=True)
class Refused:
    """The gateway refused the request (4xx): the attempt failed."""

    code: str
    message: str | None


Resolution = Requested | Refused | Failed | Retry


def retry_or_fail(
    attempt: int, error: str, now: datetime, policy: RetryPolicy, jitter: float
) -> Retry | Failed:
    """Another round, or — after ``max_attempts`` rounds — failure to reconciliation.

    Unlike a capture, void or refund (``retry.retry_later``), a request whose outcome
    is unknown moves no money: a payment the gateway may have created waits for the
    customer, who never got its client secret. So spent rounds end the attempt
    (``NEEDS_RECONCILIATION``, docs/contract.md §3.7) instead of looking up forever."""
    if attempt >= policy.max_attempts:
        return Failed("retry_budget_exhausted")
    return Retry(now + timedelta(seconds=policy.delay_s(attempt, jitter)), error)


def after_call(
    claim: Claim, outcome: GatewayOutcome, now: datetime, policy: RetryPolicy, jitter: float
) -> Resolution:
    if outcome.kind == "succeeded":
        intent, secret = outcome.body.get("id"), outcome.body.get("client_secret")
        expires_at = outcome.body.get("expires_at")
        if isinstance(intent, str) and 0 < len(intent) <= 64 and isinstance(secret, str) and secret:
            return Requested(intent, secret, str(expires_at) if expires_at is not None else None)
        # created, but not usable: the replay next round returns the same answer; an
        # operator sees it as retry_budget_exhausted with this last error
        return retry_or_fail(claim.round, "malformed_answer", now, policy, jitter)
    if outcome.kind == "declined":
        return Refused(outcome.code or outcome.kind, outcome.message)
    return retry_or_fail(claim.round, outcome.reason or "unknown", now, policy, jitter)
