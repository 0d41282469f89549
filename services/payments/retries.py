"""checkout.orders.v1 ``PaymentRetryRequested`` and orders.status.v1
``OrderStatusChanged``: a customer's retry with another payment method is accepted
only once orders published that the current attempt failed. A retry that arrives while
the attempt is still in flight is kept as the order's *pending retry* and decided again
on each published status of the attempt.

Each handler loads the order, lets ``domain.decide_retry`` decide, saves the result in
one update and emits it (``effects``), in the record's transaction.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from schemas.contract import OrderStatusChanged, PaymentRetryRequested
from services.payments import domain, store
from services.payments.domain import Decision
from services.payments.effects import emit_decision
from services.payments.metrics import Metrics
from services.payments.orders import open_attempt
from services.runtime.errors import validated
from services.runtime.messages import Context

security_log = logging.getLogger("paysaga.payments.security")


async def on_retry_requested(ctx: Context, metrics: Metrics, window: timedelta) -> None:
    retry = validated(PaymentRetryRequested, ctx.payload)
    # the new intent's lock first, as a confirmation of it takes it before the order
    if retry.payment_intent_id is not None:
        await store.lock_intent(ctx.conn, retry.payment_intent_id)
    row = await store.load_order(ctx.conn, retry.order_id)
    order = store.order_from_row(row) if row else None
    decision = domain.decide_retry(
        order,
        retry.payment_intent_id,
        retry.payment_method,
        row.saga_status if row else None,
    )
    if decision.outcome == "held" and order is not None:
        # The attempt may still fail (a capture not yet declined, a status not yet
        # published): keep the request until orders.status.v1 says how the attempt
        # ended, so a customer who retries on seeing PAYMENT_FAILED is never refused
        # for our lag.
        pending_retry = {
            "payment_intent_id": retry.payment_intent_id,
            "payment_method": retry.payment_method,
            "event_id": ctx.event_id,
        }
        await store.set_order_fields(ctx.conn, order.order_id, pending_retry=pending_retry)
        metrics.retries.labels("held", decision.reason).inc()
        await emit_decision(ctx, decision)
        return
    if decision.order is not None:
        # the new attempt has no published status yet
        await store.save_order(ctx.conn, decision.order, pending_retry=None, saga_status=None)
    await _emit_settled(ctx, decision, metrics, window)


async def on_status_changed(ctx: Context, metrics: Metrics, window: timedelta) -> None:
    """Mirror every published status of the current attempt: payments must know that
    a capture decline or an out-of-stock void failed the attempt, and that a failed
    attempt went on to NEEDS_RECONCILIATION, to accept a retry only when orders will.
    A pending retry is decided again on it."""
    status = validated(OrderStatusChanged, ctx.payload)
    saga_status = status.status.value
    if not domain.mirror_may_change(saga_status) and await store.record_saga_status(
        ctx.conn, status.order_id, status.version, status.payment_intent_id, saga_status
    ):
        return  # recorded in one statement: nothing else to decide
    row = await store.load_order(ctx.conn, status.order_id)
    if row is None or status.version <= row.saga_version:
        return
    order = store.order_from_row(row)
    if status.payment_intent_id != order.payment_intent_id:
        # about an earlier attempt
        await store.set_order_fields(ctx.conn, order.order_id, saga_version=status.version)
        return
    mirrored = domain.mirror_status(order, saga_status)
    pending = row.pending_retry
    decision = (
        None
        if pending is None
        else domain.decide_retry(
            mirrored, pending["payment_intent_id"], pending["payment_method"], saga_status
        )
    )
    fields: dict[str, object] = {"saga_version": status.version, "saga_status": saga_status}
    if decision is not None and decision.outcome != "held":
        fields["pending_retry"] = None
        if decision.order is not None:
            mirrored = decision.order
            fields["saga_status"] = None  # the new attempt has no published status yet
    if mirrored == order:
        await store.set_order_fields(ctx.conn, order.order_id, **fields)
    else:
        await store.save_order(ctx.conn, mirrored, **fields)
    if decision is not None and decision.outcome != "held":
        assert pending is not None
        await _emit_settled(ctx, decision, metrics, window, causation=pending["event_id"])


async def _emit_settled(
    ctx: Context,
    decision: Decision,
    metrics: Metrics,
    window: timedelta,
    causation: str | None = None,
) -> None:
    """Count and emit a retry decided for good (its result saved already); an accepted
    one opens the new attempt."""
    metrics.retries.labels(decision.outcome, decision.reason or "none").inc()
    if decision.outcome == "rejected":
        security_log.warning("payment retry rejected: %s", decision.reason)
    emitted = await emit_decision(ctx, decision, causation=causation)
    if decision.order is not None:
        await open_attempt(ctx, decision.order, emitted[0], metrics, window)
