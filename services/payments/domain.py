"""Pure decisions of the payments service (docs/contract.md §2.1, §2.2): register orders,
accept retries and decide what a gateway confirmation means.

Guarantees: no I/O, no clock, no randomness (callers pass `now`); every function maps a
loaded state plus one input to a `Decision` that the handler saves, emits (outbox) and
audits in one transaction. A rejection never changes state. Events and audit entries
are their `schemas.events` models (docs/saga-events.md), built here: validated when the
decision is made, emitted as they are; audit entries never carry card data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from schemas.contract import reason_code
from schemas.events import (
    AuditRecorded,
    OrderRegistered,
    PaymentAccepted,
    PaymentDeclined,
    PaymentRetryAccepted,
    StockItem,
)

__all__ = [
    "SETTLED_NOT_FAILED",
    "Confirmation",
    "Decision",
    "Item",
    "Order",
    "decide_confirmation",
    "decide_match_unmatched",
    "decide_order_placed",
    "decide_retry",
    "mirror_status",
]

# --- state and decisions ----------------------------------------------------------

OrderStatus = Literal["pending", "accepted", "failed", "flagged"]
ConfirmationType = Literal["payment.authorized", "payment.captured", "payment.failed"]
DecisionOutcome = Literal[
    "registered",
    "duplicate",
    "rejected",
    "parked",
    "accepted",
    "declined",
    "retry_accepted",
    "held",
]
#: what a decision emits on payments.events.v1
PaymentsEvent = OrderRegistered | PaymentRetryAccepted | PaymentAccepted | PaymentDeclined
Action = Literal["order_placed", "payment_retry", "confirmation", "unmatched_matched"]
#: the audit `subject` of each decided action
_SUBJECTS: dict[Action, str] = {
    "order_placed": "order",
    "payment_retry": "payment_retry",
    "confirmation": "gateway_confirmation",
    "unmatched_matched": "unmatched_payment",
}

#: orders' published statuses in which an attempt is settled for good: no retry
SETTLED_NOT_FAILED = frozenset({"PAID_CONFIRMED", "REFUNDED", "NEEDS_RECONCILIATION"})


@dataclass(frozen=True, slots=True)
class Item:
    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Order:
    """Payments' view of an order: the current attempt and whether it is still awaiting
    a confirmation (`pending`). `content_hash` identifies the OrderPlaced content;
    `earlier_intents` are the payment intents of the attempts before the current one.
    `payment_intent_id` is None while paysaga requests the attempt's payment from the
    gateway (docs/contract.md §3.7): no confirmation can match it until the gateway named it."""

    order_id: str
    customer_id: str
    currency: str
    total_amount: int
    payment_intent_id: str | None
    payment_method: str
    attempt: int
    status: OrderStatus
    items: tuple[Item, ...]
    correlation_id: str | None
    content_hash: str
    earlier_intents: tuple[str, ...] = ()
    #: OrderPlaced's, passed on in OrderRegistered (not stored: nothing here needs it)
    conference_id: str | None = None


@dataclass(frozen=True, slots=True)
class Confirmation:
    """A signature-verified, card-data-free gateway webhook. `record_time` is when the
    bridge appended it to Kafka."""

    gateway: str
    gateway_event_id: str
    type: ConfirmationType
    transaction_id: str
    payment_intent_id: str
    order_id: str | None
    amount: int
    currency: str
    payment_method_type: str
    brand: str | None
    last4: str | None
    failure_code: str | None
    failure_message: str | None
    record_time: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do: save `order` when not None, emit `events` in order (on
    payments.events.v1), and record the `audit` entries (on audit.events.v1)."""

    outcome: DecisionOutcome
    reason: str | None = None
    order: Order | None = None
    events: tuple[PaymentsEvent, ...] = ()
    audit: tuple[AuditRecorded, ...] = ()


def _audit(
    action: Action,
    outcome: DecisionOutcome,
    reason: str | None,
    order_id: str | None,
    confirmation: Confirmation | None = None,
) -> AuditRecorded:
    return AuditRecorded(
        subject=_SUBJECTS[action],
        action=action,
        outcome=outcome,
        reason=reason,
        order_id=order_id,
        transaction_id=confirmation.transaction_id if confirmation else None,
        gateway_event_id=confirmation.gateway_event_id if confirmation else None,
    )


def decide_order_placed(existing: Order | None, incoming: Order) -> Decision:
    """Register a new order as attempt 1, pending, emitting OrderRegistered.

    Idempotent: the same content again (equal `content_hash`) is a `duplicate` that emits
    nothing; different content for a known order_id is rejected (`order_conflict`).
    """
    if existing is not None:
        if existing.content_hash == incoming.content_hash:
            return Decision(
                "duplicate", audit=(_audit("order_placed", "duplicate", None, existing.order_id),)
            )
        reason = "order_conflict"
        return Decision(
            "rejected",
            reason,
            audit=(_audit("order_placed", "rejected", reason, existing.order_id),),
        )
    order = replace(incoming, attempt=1, status="pending")
    event = OrderRegistered(
        order_id=order.order_id,
        attempt=order.attempt,
        customer_id=order.customer_id,
        amount=order.total_amount,
        currency=order.currency,
        payment_intent_id=order.payment_intent_id,
        conference_id=order.conference_id or None,
    )
    audit = _audit("order_placed", "registered", None, order.order_id)
    return Decision("registered", None, order, (event,), (audit,))


def decide_retry(
    order: Order | None,
    payment_intent_id: str | None,
    payment_method: str,
    saga_status: str | None,
) -> Decision:
    """Decide a PaymentRetryRequested. `saga_status` is the order's status as orders last
    published it for the current attempt (None before the first).

    Accepted only when the current attempt failed here and orders published
    PAYMENT_FAILED for it: attempt + 1 with the new intent, pending again, emitting
    PaymentRetryAccepted (orders ignores a retry in any other status, and every event of
    the new attempt with it). `held` (reason `attempt_in_flight`) while the attempt
    was accepted or failed but orders has not published how it ended: the handler keeps
    the request and decides it again on the next status.

    Rejections: `unknown_order`; `retry_not_allowed_in_status` (pending, flagged, or
    settled for good: PAID_CONFIRMED, REFUNDED, NEEDS_RECONCILIATION);
    `payment_intent_reused` (the intent of this or an earlier attempt: confirmations are
    matched by intent, so reusing one would let an old attempt's confirmations settle
    the new one). Without `payment_intent_id` the new attempt's payment is requested
    from the gateway (its intent is new by construction).
    """
    reason: str | None = None
    if order is None:
        reason = "unknown_order"
    elif order.status not in ("accepted", "failed") or saga_status in SETTLED_NOT_FAILED:
        reason = "retry_not_allowed_in_status"
    elif payment_intent_id is not None and (
        payment_intent_id == order.payment_intent_id or payment_intent_id in order.earlier_intents
    ):
        reason = "payment_intent_reused"
    if order is None or reason is not None:
        order_id = order.order_id if order else None
        return Decision(
            "rejected", reason, audit=(_audit("payment_retry", "rejected", reason, order_id),)
        )
    if order.status != "failed" or saga_status != "PAYMENT_FAILED":
        reason = "attempt_in_flight"
        return Decision(
            "held", reason, audit=(_audit("payment_retry", "held", reason, order.order_id),)
        )
    retried = replace(
        order,
        attempt=order.attempt + 1,
        payment_intent_id=payment_intent_id,
        payment_method=payment_method,
        status="pending",
        earlier_intents=(*order.earlier_intents, *_known(order.payment_intent_id)),
    )
    event = PaymentRetryAccepted(
        order_id=retried.order_id,
        attempt=retried.attempt,
        customer_id=retried.customer_id,
        amount=retried.total_amount,
        currency=retried.currency,
        payment_intent_id=retried.payment_intent_id,
        payment_method=retried.payment_method,
    )
    audit = _audit("payment_retry", "retry_accepted", None, retried.order_id)
    return Decision("retry_accepted", None, retried, (event,), (audit,))


def mirror_status(order: Order, saga_status: str) -> Order:
    """The order as a status that orders published for its current attempt leaves it:
    PAYMENT_FAILED fails an accepted (or flagged) attempt — a capture decline or an
    out-of-stock void — so that a retry can be accepted."""
    if mirror_may_change(saga_status) and order.status in ("accepted", "flagged"):
        return replace(order, status="failed")
    return order


def mirror_may_change(saga_status: str) -> bool:
    """Whether mirroring ``saga_status`` may change an order (``mirror_status``): only
    PAYMENT_FAILED does; any other status is recorded and nothing else."""
    return saga_status == "PAYMENT_FAILED"


def _known(payment_intent_id: str | None) -> tuple[str, ...]:
    return () if payment_intent_id is None else (payment_intent_id,)


def _mismatch(order: Order, c: Confirmation, attempt_confirmed: bool) -> str | None:
    if c.payment_intent_id != order.payment_intent_id:
        return "payment_intent_mismatch"
    if c.amount != order.total_amount:
        return "amount_mismatch"
    if c.currency != order.currency:
        return "currency_mismatch"
    # flagged: a record of the order was dead-lettered; if this attempt has no stored
    # confirmation yet, this may be that very record, replayed: it still settles it
    awaiting = order.status == "pending" or (order.status == "flagged" and not attempt_confirmed)
    if not awaiting:
        return "order_not_awaiting_payment"
    return None


def _confirm(
    order: Order | None,
    c: Confirmation,
    action: Literal["confirmation", "unmatched_matched"],
    attempt_confirmed: bool = True,
) -> Decision:
    if order is None or (
        c.payment_intent_id != order.payment_intent_id
        and c.payment_intent_id not in order.earlier_intents
    ):
        # no order, or an intent the order has not (yet) seen: e.g. the payment of a
        # retry whose PaymentRetryRequested is still on its way. Matched when it arrives.
        order_id = order.order_id if order else c.order_id
        return Decision("parked", audit=(_audit(action, "parked", None, order_id, c),))
    reason = _mismatch(order, c, attempt_confirmed)
    if reason is not None:
        return Decision(
            "rejected", reason, audit=(_audit(action, "rejected", reason, order.order_id, c),)
        )
    if c.type == "payment.failed":
        reason = reason_code(c.failure_code)
        failed = replace(order, status="failed")
        declined = PaymentDeclined(
            order_id=order.order_id,
            attempt=order.attempt,
            customer_id=order.customer_id,
            payment_intent_id=c.payment_intent_id,  # the order's (matched above)
            transaction_id=c.transaction_id,
            amount=order.total_amount,
            currency=order.currency,
            failure_code=c.failure_code,
            failure_message=c.failure_message,
        )
        audit = _audit(action, "declined", reason, order.order_id, c)
        return Decision("declined", reason, failed, (declined,), (audit,))
    accepted = PaymentAccepted(
        order_id=order.order_id,
        attempt=order.attempt,
        payment_intent_id=c.payment_intent_id,  # the order's (matched above)
        transaction_id=c.transaction_id,
        flow="authorization" if c.type == "payment.authorized" else "sale",
        amount=order.total_amount,
        currency=order.currency,
        gateway=c.gateway,
        customer_id=order.customer_id,
        items=[StockItem(sku=item.sku, quantity=item.quantity) for item in order.items],
        payment_method_type=c.payment_method_type,
        brand=c.brand,
        last4=c.last4,
    )
    audit = _audit(action, "accepted", None, order.order_id, c)
    return Decision("accepted", None, replace(order, status="accepted"), (accepted,), (audit,))


def decide_confirmation(
    order: Order | None, c: Confirmation, *, attempt_confirmed: bool = True
) -> Decision:
    """Decide a confirmation against the order it names (loaded by `c.order_id`, else by
    `c.payment_intent_id`). `attempt_confirmed`: a confirmation of the order's current
    attempt is stored already (only consulted for a `flagged` order).

    - no order, or an intent that is neither the order's current one nor an earlier
      attempt's (a retry's payment ahead of its PaymentRetryRequested): `parked` (kept in
      the unmatched store, see `decide_match_unmatched`);
    - rejected, in this order: `payment_intent_mismatch` (an earlier attempt's intent),
      `amount_mismatch`, `currency_mismatch`, `order_not_awaiting_payment` (this attempt
      already settled; a `flagged` order without `attempt_confirmed` is still awaiting
      it: the flag came from a dead-lettered record, maybe this one); a rejection
      changes nothing;
    - payment.failed: order failed, PaymentDeclined (reason: the failure code as a
      snake_case reason);
    - payment.authorized / payment.captured: order accepted, PaymentAccepted with flow
      `authorization` / `sale`.
    Only the first confirmation of an attempt settles it, so a duplicate or late one can
    never emit a second PaymentAccepted or PaymentDeclined.
    """
    return _confirm(order, c, "confirmation", attempt_confirmed)


def decide_match_unmatched(
    order: Order, unmatched: Sequence[Confirmation], now: datetime, window: timedelta
) -> list[tuple[Confirmation, Decision]]:
    """Match unmatched payments (state `parked`) when `order`'s attempt opens (call after
    it is registered, or when its requested payment intent is known).

    Considered: confirmations for the order's current intent (and its order_id, when they
    name one) recorded at most `window` before `now`, oldest first. Each is decided by
    `decide_confirmation` against the order as left by the previous one, so the first
    acceptable one settles the attempt and the rest are rejected with their reason.
    Returns (confirmation, decision) for each considered one, in that order: the handler
    removes them from the unmatched store. The others stay unmatched, for an operator.
    """
    due = sorted(
        (
            c
            for c in unmatched
            if c.payment_intent_id == order.payment_intent_id
            and c.order_id in (None, order.order_id)
            and now - c.record_time <= window
        ),
        key=lambda c: (c.record_time, c.gateway_event_id),
    )
    results: list[tuple[Confirmation, Decision]] = []
    for c in due:
        decision = _confirm(order, c, "unmatched_matched")
        order = decision.order or order
        results.append((c, decision))
    return results
