"""Capture handlers, inside the consumed record's transaction (transaction A).

``StockReserved``: a sale is confirmed at once (``SaleConfirmed``; the gateway charged it
already, no call). An authorization is recorded as a ``pending`` capture intent and the
worker is woken at commit; the gateway is never called inside this transaction. Both are
idempotent per transaction id: a second StockReserved of the transaction does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from schemas.events import PaymentContext, SaleConfirmed, StockReserved
from services.capture import domain, store
from services.runtime.messages import Context, Handlers
from services.runtime.topics import CAPTURE_TOPIC, INVENTORY_TOPIC
from services.runtime.wakeup import notify

_CONTEXT_FIELDS = set(PaymentContext.model_fields)


def _occurred_at(envelope: Mapping[str, object] | None) -> datetime | None:
    raw = (envelope or {}).get("occurred_at")
    if not isinstance(raw, str):
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


async def on_stock_reserved(ctx: Context) -> None:
    event = StockReserved.model_validate(ctx.payload)
    context = PaymentContext.model_validate(event.model_dump(include=_CONTEXT_FIELDS))
    intent = domain.decide_stock_reserved(
        context.flow, context.transaction_id, _occurred_at(ctx.envelope), ctx.now
    )
    if not await store.record_intent(ctx.conn, context, intent, ctx.cause, ctx.now):
        return  # this transaction's capture (or sale) was recorded before
    if intent.state == "sale_confirmed":
        confirmed = SaleConfirmed(**context.model_dump())
        await ctx.emit(CAPTURE_TOPIC, confirmed, key=context.order_id)
    else:
        await notify(ctx.conn, store.CHANNEL)


#: topic -> event model -> handler (checked against topics.yaml by a unit test)
HANDLERS: Handlers = {
    INVENTORY_TOPIC: {StockReserved: on_stock_reserved},
}
