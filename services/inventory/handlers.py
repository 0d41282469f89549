"""Inventory handlers: each runs inside the consumed record's transaction (inbox row,
stock change, outbox event and consumer position commit together).

Reservations are idempotent per (order_id, attempt): a second PaymentAccepted for the
same attempt — whatever its event id — reserves nothing and emits nothing, and a
settlement (commit/release) happens at most once per reservation. A newer attempt's
PaymentAccepted releases, in its own transaction, what an earlier attempt of the order
still holds; that attempt's own release, when it arrives, is then a duplicate.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from schemas.contract import StockLevelSet
from schemas.events import (
    AuthorizationExpired,
    CaptureDeclined,
    PaymentAccepted,
    PaymentCaptured,
    PaymentContext,
    SaleConfirmed,
    StockCommitted,
    StockItem,
    StockReleased,
    StockReservationFailed,
    StockReserved,
)
from services.inventory import domain, store
from services.runtime.errors import PermanentError
from services.runtime.messages import Context, Handler, Handlers
from services.runtime.topics import CAPTURE_TOPIC, CATALOG_TOPIC, INVENTORY_TOPIC, PAYMENTS_TOPIC

_CONTEXT_FIELDS = set(PaymentContext.model_fields)


def _context(event: BaseModel) -> dict[str, Any]:
    return event.model_dump(include=_CONTEXT_FIELDS)


def _items(lines: tuple[domain.Line, ...]) -> list[StockItem]:
    return [StockItem(sku=line.sku, quantity=line.quantity) for line in lines]


async def on_stock_level_set(ctx: Context) -> None:
    """Set a SKU's quota. A quota below its reserved + sold is a permanent error (to the
    dead-letter topic, where an operator sees it) — see ``domain.stock_level_rejection``."""
    event = StockLevelSet.model_validate(ctx.payload)
    if await store.set_available(ctx.conn, event.sku, event.available, ctx.now) is None:
        current = await store.get_stock(ctx.conn, event.sku)
        reason = domain.stock_level_rejection(current, event.available) or "concurrent change"
        raise PermanentError("stock_below_committed", reason)


async def on_payment_accepted(ctx: Context) -> None:
    """Claim this attempt's reservation, with the order's others locked (one statement);
    release what earlier attempts still hold (``domain.superseded_attempts``: their own
    release may still be on its way); then reserve all lines or none → StockReserved, or
    StockReservationFailed{short_skus}."""
    event = PaymentAccepted.model_validate(ctx.payload)
    lines = domain.merge_lines((item.sku, item.quantity) for item in event.items)
    held, claimed = await store.claim_reservation(
        ctx.conn, event.order_id, event.attempt, event.transaction_id, lines, ctx.now
    )
    superseded = domain.superseded_attempts(
        event.attempt, ((attempt, state) for attempt, (state, _) in held.items())
    )
    if superseded:
        old = [line for attempt in superseded for line in held[attempt][1]]
        await store.lock_stock(ctx.conn, [line.sku for line in (*lines, *old)])
        for attempt in superseded:
            await store.settle(
                ctx.conn, event.order_id, attempt, held[attempt][1], "released", ctx.now
            )
    if not claimed:
        return  # this attempt was reserved (or refused) before: its event exists already
    short = await store.hold_claimed(ctx.conn, event.order_id, event.attempt, lines, ctx.now)
    outcome: BaseModel = (
        StockReservationFailed(**_context(event), short_skus=short)
        if short
        else StockReserved(**_context(event), items=_items(lines))
    )
    await ctx.emit(INVENTORY_TOPIC, outcome, key=event.order_id)


def _settlement_handler(
    model: type[PaymentContext], settlement: domain.Settlement, reason: str | None = None
) -> Handler:
    target: domain.ReservationState = "committed" if settlement == "commit" else "released"

    async def handle(ctx: Context) -> None:
        event = model.model_validate(ctx.payload)
        # a held reservation, as a rule: settled at once; else decided on its state
        lines = await store.settle_held(ctx.conn, event.order_id, event.attempt, target, ctx.now)
        if lines is None:
            held = await store.lock_reservation(ctx.conn, event.order_id, event.attempt)
            state, lines = held if held is not None else (None, ())
            decision = domain.decide_settlement(state, settlement)
            if decision == "duplicate":
                return
            if decision == "reject":
                raise PermanentError(
                    "reservation_not_held",
                    f"{model.__name__} for {event.order_id}#{event.attempt}:"
                    f" reservation is {state}",
                )
            await store.settle(ctx.conn, event.order_id, event.attempt, lines, target, ctx.now)
        outcome: BaseModel = (
            StockCommitted(**_context(event), items=_items(lines))
            if reason is None
            else StockReleased(**_context(event), items=_items(lines), reason=reason)
        )
        await ctx.emit(INVENTORY_TOPIC, outcome, key=event.order_id)

    handle.__name__ = f"on_{model.__name__}"
    return handle


on_payment_captured = _settlement_handler(PaymentCaptured, "commit")
on_sale_confirmed = _settlement_handler(SaleConfirmed, "commit")
on_capture_declined = _settlement_handler(CaptureDeclined, "release", "capture_declined")
on_authorization_expired = _settlement_handler(
    AuthorizationExpired, "release", "authorization_expired"
)

#: topic -> event model -> handler (checked against topics.yaml by a unit test)
HANDLERS: Handlers = {
    CATALOG_TOPIC: {StockLevelSet: on_stock_level_set},
    PAYMENTS_TOPIC: {PaymentAccepted: on_payment_accepted},
    CAPTURE_TOPIC: {
        PaymentCaptured: on_payment_captured,
        SaleConfirmed: on_sale_confirmed,
        CaptureDeclined: on_capture_declined,
        AuthorizationExpired: on_authorization_expired,
    },
}
