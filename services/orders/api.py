"""The status API (docs/contract.md §3.2): ``GET /orders/{order_id}``, and the operator console
under ``/console/`` (``services/orders/console/``).

Reads through its own connection, never the consumer's transaction: it sees committed
projections only. The runtime adds ``/healthz``, ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.contract import OrderStatus
from services.orders import store


class HistoryEntry(BaseModel):
    status: OrderStatus
    reason: str | None
    at: datetime


class OrderStatusView(BaseModel):
    order_id: str
    status: OrderStatus
    reason: str | None
    amount: int
    currency: str
    payment_intent_id: str | None
    transaction_id: str | None
    updated_at: datetime
    history: list[HistoryEntry]


class NotFound(BaseModel):
    detail: str


def create_api(engine: AsyncEngine, console: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """The status API; ``console`` adds the operator console's pages to it."""
    app = FastAPI(
        title="paysaga status API",
        version="1",
        description="Order payment status (docs/contract.md §3.2). Times are RFC 3339 UTC.",
    )

    @app.get(
        "/orders/{order_id}",
        response_model=OrderStatusView,
        responses={404: {"model": NotFound, "description": "order not found"}},
    )
    async def get_order(order_id: str) -> OrderStatusView:
        async with engine.connect() as conn:
            found = await store.read_order(conn, order_id)
        if found is None:
            raise HTTPException(status_code=404, detail="order not found")
        return OrderStatusView.model_validate(found)

    if console is not None:
        console(app)
    return app
