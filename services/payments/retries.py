"""checkout.orders.v1 ``PaymentRetryRequested`` and orders.status.v1
``OrderStatusChanged``: a customer's retry with another payment method is accepted
only once orders published that the current attempt failed. A retry that arrives while
the attempt is still in flight is kept as the order's *pending retry* and decided again
on each published status of the attempt.

Each handler loads the order, lets ``domain.decide_retry`` decide, saves the result in
one update and emits it (``effects``), in the record's transaction.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.contract import OrderStatusChanged, PaymentRetryRequested
from schemas.envelope import event_type_of
from services.payments import domain, store
from services.payments.domain import Decision
from services.payments.effects import emit_decision
from services.payments.metrics import Metrics
from services.payments.orders import open_attempt
from services.runtime import deferred
from services.runtime.errors import PermanentError, validated
from services.runtime.inbox import parse_envelope
from services.runtime.messages import Context, Record
from services.runtime.topics import (
    CHECKOUT_ORDERS_TOPIC,
    CONFIRMATIONS_TOPIC,
    PAYMENTS_TOPIC,
    STATUS_TOPIC,
)

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
    recorded = deferred.scoped(ctx.conn, _Recorded)
    if recorded is not None and ctx.record.at in recorded.records:
        return  # recorded with the batch's other statuses (``record_batch_statuses``)
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


@dataclasses.dataclass
class _Recorded:
    """The status records of a batch recorded before it is applied, by (topic, partition,
    offset): their handler has nothing left to do."""

    records: set[tuple[str, int, int]] = dataclasses.field(default_factory=set)


_STATUS_CHANGED = event_type_of(OrderStatusChanged)
_INT4_MAX = 2**31 - 1  # saga_version's column


async def record_batch_statuses(conn: AsyncConnection, records: Sequence[Record]) -> None:
    """Record a batch's published statuses that change nothing but the mirror in one
    statement (``store.record_saga_statuses``), before its records are applied one by one,
    instead of one statement each. The result is what applying them in turn gives:
    - an order's statuses are taken up to its first that may change it (PAYMENT_FAILED),
      does not parse, shares its event id with another record of the batch (one of them
      is a duplicate) or names another order than its key (the order's records may then
      be on several partitions, applied in the order they were written, not as listed
      here): that one and those after it are decided one by one, in order;
    - an order with a checkout record in the batch (a retry, whose decision reads the
      mirror) is left to one by one altogether, as is an order with a record that takes
      a payment intent's lock (PaymentIntentCreated, a confirmation): that lock is taken
      before the order's row, never after it (a confirmation applied meanwhile takes
      them in that order);
    - an order unknown or with a retry pending is not settled by the statement: its
      statuses are decided one by one too.
    Other records neither read nor write the mirror. Nothing where writes go at once."""
    recorded = deferred.scoped(conn, _Recorded)
    if recorded is None:
        return
    left: set[str | None] = set()
    event_ids: Counter[str] = Counter()
    statuses: list[tuple[Record, dict[str, Any] | None]] = []
    for rec in records:
        if rec.topic == CONFIRMATIONS_TOPIC:
            left.add(rec.key_str)  # the order id, else the payment intent id
            continue
        if rec.topic not in (STATUS_TOPIC, CHECKOUT_ORDERS_TOPIC, PAYMENTS_TOPIC):
            continue
        envelope = _envelope_of(rec)
        if envelope is not None:
            event_ids[str(envelope["event_id"])] += 1
        if rec.topic == STATUS_TOPIC:
            statuses.append((rec, envelope))
        else:
            left.update((rec.key_str, _order_of(envelope)))
    taken: list[tuple[Record, OrderStatusChanged]] = []
    for rec, envelope in statuses:
        if envelope is not None and envelope["event_type"] != _STATUS_CHANGED:
            continue  # an event type the group ignores
        status = _status_of(envelope)
        if status is None:
            left.add(rec.key_str)  # its handler rejects it (the batch fails)
            continue
        assert envelope is not None
        ours = {rec.key_str, status.order_id, status.payment_intent_id} - {None}
        if (
            ours & left
            or not _mirror_only(status)
            or rec.key_str != status.order_id
            or event_ids[str(envelope["event_id"])] > 1
        ):
            left.update((rec.key_str, status.order_id))
            continue
        taken.append((rec, status))
    settled = await store.record_saga_statuses(
        conn,
        [(s.order_id, s.version, s.payment_intent_id, s.status.value) for _, s in taken],
    )
    recorded.records.update(r.at for r, s in taken if s.order_id in settled)


def _envelope_of(rec: Record) -> dict[str, Any] | None:
    """The record's envelope, None if it has none (its handler rejects it)."""
    try:
        return parse_envelope(rec.value)
    except PermanentError:
        return None


def _order_of(envelope: dict[str, Any] | None) -> str | None:
    order_id = envelope["payload"].get("order_id") if envelope is not None else None
    return order_id if isinstance(order_id, str) else None


def _status_of(envelope: dict[str, Any] | None) -> OrderStatusChanged | None:
    """The status of a status record's envelope as its handler reads it; None where its
    handler rejects it."""
    if envelope is None:
        return None
    try:
        return OrderStatusChanged.model_validate(envelope["payload"])
    except ValidationError:
        return None


def _mirror_only(status: OrderStatusChanged) -> bool:
    """Whether recording ``status`` is all its handler may do (``record_saga_status``)."""
    return not domain.mirror_may_change(status.status.value) and status.version <= _INT4_MAX


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
