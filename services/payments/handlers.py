"""payments handlers (store the payment confirmation and record the order's status:
docs/contract.md §2.1, §2.2), one module per input: ``confirmations.py``
(gateway.confirmations.v1), ``orders.py`` (OrderPlaced, PaymentIntentCreated),
``retries.py`` (PaymentRetryRequested, OrderStatusChanged). Here: their routes, and
the dead-letter hook.

Every handler runs inside the consumed record's transaction (services/runtime): the
order state, stored confirmation, emitted saga events, audit events and the consumer
position commit together. Nothing here calls Kafka or a clock directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.contract import OrderPlaced, OrderStatusChanged, PaymentRetryRequested
from schemas.envelope import event_type_of
from schemas.events import OrderFlaggedForReconciliation, PaymentIntentCreated
from services.payments import confirmations, orders, retries, store
from services.payments.domain import Confirmation
from services.payments.metrics import Metrics
from services.runtime.messages import Context, Handlers, Record
from services.runtime.outbox import Cause, write_event
from services.runtime.topics import (
    CHECKOUT_ORDERS_TOPIC,
    CONFIRMATIONS_TOPIC,
    PAYMENTS_TOPIC,
    STATUS_TOPIC,
)

log = logging.getLogger("paysaga.payments")


@dataclasses.dataclass(frozen=True)
class PaymentsHandlers:
    secrets: dict[str, list[str]]
    tolerance_s: int
    unmatched_window: timedelta
    metrics: Metrics

    def handlers(self) -> Handlers:
        """topic -> event model -> handler, for the enveloped topics; the gateway's
        webhooks are raw (``on_confirmation``, routed by ``app.py``)."""
        return {
            CHECKOUT_ORDERS_TOPIC: {
                OrderPlaced: self.on_order_placed,
                PaymentRetryRequested: self.on_retry_requested,
            },
            STATUS_TOPIC: {OrderStatusChanged: self.on_status_changed},
            # its own: a requested payment's intent, to match a confirmation that came first
            PAYMENTS_TOPIC: {PaymentIntentCreated: self.on_intent_created},
        }

    async def on_confirmation(self, ctx: Context) -> None:
        await confirmations.on_confirmation(ctx, self._check(ctx.record), self.metrics)

    def _check(self, rec: Record) -> tuple[Confirmation, str] | str:
        return confirmations.check(rec, self.secrets, self.tolerance_s)

    async def on_order_placed(self, ctx: Context) -> None:
        await orders.on_order_placed(ctx, self.metrics, self.unmatched_window)

    async def on_intent_created(self, ctx: Context) -> None:
        await orders.on_intent_created(ctx, self.metrics, self.unmatched_window)

    async def on_retry_requested(self, ctx: Context) -> None:
        await retries.on_retry_requested(ctx, self.metrics, self.unmatched_window)

    async def prepare(self, conn: AsyncConnection, records: Sequence[Record]) -> None:
        """Before a batch's records are applied: its statuses recorded at once."""
        await retries.record_batch_statuses(conn, records)

    async def on_status_changed(self, ctx: Context) -> None:
        await retries.on_status_changed(ctx, self.metrics, self.unmatched_window)

    async def flag_dead_letter(
        self, conn: AsyncConnection, rec: Record, exc: BaseException
    ) -> None:
        """A confirmation or OrderPlaced record that could not be processed (e.g. the
        database stayed down past the retry budget): flag its order for reconciliation —
        never leave it looking merely pending — if the order is known. Runs in the
        dead-letter transaction. Other records (a malformed PaymentRetryRequested, a
        status change) change no money and flag nothing.

        The key is the bridge's (order id, else payment intent) for a confirmation and
        the order id for checkout.orders.v1, whose event type is read from the envelope."""
        key = rec.key_str
        if key is None or not _flags_its_order(rec):
            return
        row = await store.load_order(conn, key) or await store.load_order_by_intent(conn, key)
        if row is None:
            return
        order = dataclasses.replace(store.order_from_row(row), status="flagged")
        await store.save_order(conn, order)
        flagged = OrderFlaggedForReconciliation(
            order_id=order.order_id, attempt=order.attempt, reason="record_dead_lettered"
        )
        cause = Cause(f"{rec.topic}/{rec.partition}/{rec.offset}", None, order.correlation_id)
        await write_event(
            conn, PAYMENTS_TOPIC, flagged, key=order.order_id, now=datetime.now(UTC), cause=cause
        )
        log.error(
            "order %s flagged for reconciliation: %s dead-lettered (%s)",
            order.order_id,
            rec.topic,
            type(exc).__name__,
        )


def _flags_its_order(rec: Record) -> bool:
    if rec.topic == CONFIRMATIONS_TOPIC:
        return True
    if rec.topic != CHECKOUT_ORDERS_TOPIC:
        return False
    try:
        envelope = json.loads(rec.value)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting
        return False
    return isinstance(envelope, dict) and envelope.get("event_type") == event_type_of(OrderPlaced)
