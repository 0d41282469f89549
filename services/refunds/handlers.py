"""Refunds handlers, inside the consumed record's transaction (transaction A): record
the compensation a saga event asks for and wake the worker at commit. The gateway is
never called here. Idempotent per (transaction_id, action).
"""

from __future__ import annotations

from schemas.events import (
    AuthorizationExpired,
    CaptureDeclined,
    PaymentContext,
    StockReservationFailed,
)
from services.refunds import domain, store
from services.runtime.errors import PermanentError
from services.runtime.messages import Context, Handler, Handlers
from services.runtime.topics import CAPTURE_TOPIC, INVENTORY_TOPIC
from services.runtime.wakeup import notify

_CONTEXT_FIELDS = set(PaymentContext.model_fields)


def _handler(model: type[PaymentContext], trigger: domain.Trigger) -> Handler:
    async def handle(ctx: Context) -> None:
        event = model.model_validate(ctx.payload)
        context = PaymentContext.model_validate(event.model_dump(include=_CONTEXT_FIELDS))
        intent = domain.decide_compensation(context.flow, trigger, context.transaction_id)
        if intent is None:
            raise PermanentError("no_compensation", f"{model.__name__} of a {context.flow} payment")
        if await store.record_intent(ctx.conn, context, intent, ctx.cause, ctx.now):
            await notify(ctx.conn, store.CHANNEL)

    handle.__name__ = f"on_{model.__name__}"
    return handle


on_stock_reservation_failed = _handler(StockReservationFailed, "out_of_stock")
on_capture_declined = _handler(CaptureDeclined, "capture_declined")
on_authorization_expired = _handler(AuthorizationExpired, "authorization_expired")

#: topic -> event model -> handler (checked against topics.yaml by a unit test)
HANDLERS: Handlers = {
    INVENTORY_TOPIC: {StockReservationFailed: on_stock_reservation_failed},
    CAPTURE_TOPIC: {
        CaptureDeclined: on_capture_declined,
        AuthorizationExpired: on_authorization_expired,
    },
}
