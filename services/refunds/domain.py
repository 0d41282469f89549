"""Pure decisions of the refunds service: which compensation a saga event asks for, and
how a compensation round ends.

Guarantees: no I/O, no clock, no randomness. A transaction has at most one compensation
per action (void, refund), each under one idempotency key for its whole life
(``void:{txn}``, ``refund:{txn}``): a refund is never retried under a new key. A round
that follows a call which may have reached the gateway starts with a look-up, so an
unknown outcome is resolved from the gateway's own record (a recorded void, or refunds
of exactly the claimed amount and currency, mean success; refunds of another amount
fail with ``amount_mismatch`` for an operator) before anything is sent again.

An unknown outcome is never final: the money may be back already. Spending the rounds
with the outcome unknown raises the alarm once (``Stalled``: ``CompensationFailed`` →
NEEDS_RECONCILIATION) and the compensation goes on being looked up, at most
``RetryPolicy.stalled_max_s`` apart, until the gateway's record settles it (a refund
found → ``RefundSucceeded`` → REFUNDED). Only the gateway's own answer — a decline, an
unknown transaction, a payment in a state no compensation fits — fails a compensation.
The rule is the runtime's, shared with capture (``services.runtime.retry.retry_later``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from services.runtime.retry import (
    Call,
    Failed,
    GatewayOutcome,
    Lookup,
    Retry,
    RetryPolicy,
    Stalled,
    retry_later,
)

__all__ = [
    "Action",
    "Call",
    "Claim",
    "CompensationState",
    "Failed",
    "Lookup",
    "NewCompensation",
    "Resolution",
    "Retry",
    "RetryPolicy",
    "Stalled",
    "Succeeded",
    "Trigger",
    "after_call",
    "after_lookup",
    "compensation_key",
    "decide_compensation",
    "first_step",
    "refunds_the_claim",
    "retry_later",
]

Action = Literal["void", "refund"]
Trigger = Literal["out_of_stock", "capture_declined", "authorization_expired"]
CompensationState = Literal["pending", "in_flight", "unknown", "succeeded", "failed"]


def compensation_key(action: Action, transaction_id: str) -> str:
    return f"{action}:{transaction_id}"


@dataclass(frozen=True, slots=True)
class NewCompensation:
    action: Action
    reason: Trigger
    idempotency_key: str


def decide_compensation(
    flow: Literal["authorization", "sale"], trigger: Trigger, transaction_id: str
) -> NewCompensation | None:
    """Out of stock: release an authorization (void, nothing was charged) or refund a
    sale in full. A declined or expired capture: void the authorization. None for a
    combination the saga never produces (a sale has no authorization to void)."""
    if flow == "sale" and trigger != "out_of_stock":
        return None
    action: Action = "refund" if flow == "sale" else "void"
    return NewCompensation(action, trigger, compensation_key(action, transaction_id))


# --- one round -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """A compensation claimed for one round (``attempt`` is 1-based); ``alerted`` tells
    whether the alarm (``CompensationFailed``) was raised for it already."""

    transaction_id: str
    action: Action
    amount: int
    currency: str
    reason: Trigger
    prior_state: CompensationState
    attempt: int
    alerted: bool = False


@dataclass(frozen=True, slots=True)
class Succeeded:
    """``refund_id`` is set for a refund."""

    refund_id: str | None = None


Resolution = Succeeded | Failed | Retry | Stalled


def first_step(claim: Claim) -> Lookup | Call:
    # pending: never sent. unknown / a reclaimed in_flight: a call may have been applied.
    return Call() if claim.prior_state == "pending" else Lookup()


def after_lookup(claim: Claim, payment: Mapping[str, Any]) -> Call | Resolution:
    state = payment.get("state")
    if claim.action == "refund":
        refunds = payment.get("refunds") or []
        last = refunds[-1] if isinstance(refunds, list) and refunds else None
        if isinstance(last, dict) and isinstance(last.get("refund_id"), str) and last["refund_id"]:
            if not refunds_the_claim(claim, refunds):
                return Failed("amount_mismatch")
            return Succeeded(last["refund_id"])
        return Call() if state == "captured" else Failed("unexpected_payment_state")
    if payment.get("voids") or state == "voided":
        return Succeeded()
    return Call() if state == "authorized" else Failed("unexpected_payment_state")


def refunds_the_claim(claim: Claim, refunds: list[Any]) -> bool:
    """The gateway's refunds of the transaction return exactly the claimed money. A
    refund made outside paysaga (an operator's partial refund) does not settle the claim
    unless the refunds add up to the claim's amount, in its currency."""
    amounts = [r.get("amount") for r in refunds if isinstance(r, dict)]
    return (
        all(isinstance(r, dict) and r.get("currency") == claim.currency for r in refunds)
        and all(isinstance(a, int) for a in amounts)
        and sum(a for a in amounts if isinstance(a, int)) == claim.amount
    )


def after_call(
    claim: Claim, outcome: GatewayOutcome, now: datetime, policy: RetryPolicy, jitter: float
) -> Resolution:
    if outcome.kind == "succeeded":
        if claim.action == "void":
            return Succeeded()
        refund_id = outcome.body.get("refund_id")
        if isinstance(refund_id, str) and refund_id:
            return Succeeded(refund_id)
        # refunded, but unnamed: the look-up next round finds the refund's id
        return retry_later(claim, "refund_id_missing", now, policy, jitter)
    if outcome.kind == "declined":
        return Failed("declined")
    if outcome.kind == "not_found":
        return Failed("not_found")
    return retry_later(claim, outcome.reason or "unknown", now, policy, jitter)
