"""checkout.orders.v1 ``OrderPlaced`` and payments.events.v1 ``PaymentIntentCreated``:
registering an order, and opening an attempt — matching the unmatched payments of its
intent, or recording the request of its payment (docs/contract.md §3.7).

Each handler loads what its decision needs, lets ``domain`` decide, saves the result
and emits it (``effects``), in the record's transaction.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from schemas.contract import OrderPlaced
from schemas.events import AuditRecorded, PaymentIntentCreated
from services.payments import confirmation_store, domain, request_store, store, unmatched_store
from services.payments.domain import Item, Order
from services.payments.effects import emit_audit, emit_decision
from services.payments.metrics import Metrics
from services.runtime.errors import validated
from services.runtime.messages import Context
from services.runtime.outbox import Cause

log = logging.getLogger("paysaga.payments")
security_log = logging.getLogger("paysaga.payments.security")


async def on_order_placed(ctx: Context, metrics: Metrics, window: timedelta) -> None:
    placed = validated(OrderPlaced, ctx.payload)
    incoming = Order(
        order_id=placed.order_id,
        customer_id=placed.customer_id,
        currency=placed.currency,
        total_amount=placed.total_amount,
        payment_intent_id=placed.payment_intent_id,
        payment_method=placed.payment_method,
        attempt=1,
        status="pending",
        items=tuple(Item(i.sku, i.quantity) for i in placed.items),
        correlation_id=(ctx.envelope or {}).get("correlation_id"),
        content_hash=store.content_hash(ctx.payload),
        conference_id=placed.conference_id,
    )
    # a new order, as a rule: inserted at once, and decided on the stored one only if
    # it is known already (an earlier or a concurrent OrderPlaced: the insert waits for it)
    decision = domain.decide_order_placed(None, incoming)
    assert decision.order is not None
    if not await store.insert_order(ctx.conn, decision.order):
        row = await store.load_order(ctx.conn, placed.order_id)
        decision = domain.decide_order_placed(store.order_from_row(row) if row else None, incoming)
    metrics.orders.labels(decision.outcome).inc()
    if decision.outcome == "rejected":
        security_log.warning("order %s rejected: %s", placed.order_id, decision.reason)
    emitted = await emit_decision(ctx, decision)
    if decision.outcome == "registered" and decision.order is not None:
        await open_attempt(ctx, decision.order, emitted[0], metrics, window)


async def on_intent_created(ctx: Context, metrics: Metrics, window: timedelta) -> None:
    """payments.events.v1 ``PaymentIntentCreated`` (our own, docs/contract.md §3.7): the
    attempt's requested payment is recorded. A confirmation of it that came first —
    the gateway created the payment, but its answer was lost or payments died before
    storing it, and the customer paid meanwhile — matched no order and was kept
    unmatched: match it now, as when an order arrives after its payment."""
    created = validated(PaymentIntentCreated, ctx.payload)
    # the intent's lock before the order's row, as a confirmation takes them
    await store.lock_intent(ctx.conn, created.payment_intent_id)
    row = await store.load_order(ctx.conn, created.order_id)
    if row is None or (row.attempt, row.payment_intent_id) != (
        created.attempt,
        created.payment_intent_id,
    ):
        return  # an attempt that is over: its unmatched payments are an operator's
    await _match_unmatched(ctx, store.order_from_row(row), metrics, window)


async def open_attempt(
    ctx: Context, order: Order, opened_by: str, metrics: Metrics, window: timedelta
) -> None:
    """A registered order or accepted retry: match its unmatched payments, or — without
    a payment intent — record the request of its payment (docs/contract.md §3.7), caused
    by the OrderRegistered / PaymentRetryAccepted just emitted (``opened_by``), so the
    projection applies the request's events after it."""
    if order.payment_intent_id is not None:
        await _match_unmatched(ctx, order, metrics, window)
        return
    correlation = (ctx.envelope or {}).get("correlation_id")
    cause = Cause(opened_by, 1, str(correlation) if correlation is not None else None)
    await request_store.record_request(ctx.conn, order, cause, ctx.now)


async def _match_unmatched(ctx: Context, order: Order, metrics: Metrics, window: timedelta) -> None:
    found = await unmatched_store.load_unmatched_of(ctx.conn, order)
    for c, decision in domain.decide_match_unmatched(order, found.matchable, ctx.now, window):
        outcome = "matched" if decision.outcome in ("accepted", "declined") else "rejected"
        metrics.confirmations.labels(outcome, decision.reason or "none").inc()
        closing = confirmation_store.Closing(outcome, decision.reason or decision.outcome, ctx.now)
        await confirmation_store.save_confirmation(ctx.conn, c, decision, closing)
        await emit_decision(ctx, decision, causation=c.gateway_event_id)
    for r in found.given_back:
        # money an operator gives back (or gave back) is never this order's payment:
        # the order stays unpaid, and the audit trail says why
        reason = "refund_pending" if r.state == "refund_pending" else "refunded"
        log.warning(
            "order %s not matched to unmatched payment %s: %s by an operator",
            order.order_id,
            r.transaction_id,
            reason,
        )
        audit = AuditRecorded(
            subject="unmatched_payment",
            action="unmatched_matched",
            outcome="not_matched",
            reason=reason,
            order_id=order.order_id,
            transaction_id=r.transaction_id,
            gateway_event_id=r.gateway_event_id,
        )
        await emit_audit(ctx, audit, order.order_id)
