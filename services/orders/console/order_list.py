"""The reads of the orders page (``/console/orders``): counts per status, one page of
orders by filter."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

from services.orders.console.sources import Row, Sources

PAGE_SIZE = 50


@dataclasses.dataclass(frozen=True)
class OrderFilter:
    status: str | None = None
    #: only orders last changed at least this many minutes ago
    min_age_min: int | None = None
    customer: str | None = None
    #: an order id, payment intent id or transaction id (exact)
    q: str | None = None
    page: int = 1
    #: the checkout's conference_id (exact)
    conference: str | None = None


class OrderListReads(Sources):
    """The orders page's reads."""

    async def status_counts(self) -> dict[str, int]:
        rows = await self._all("orders", "SELECT status, count(*) AS n FROM orders GROUP BY status")
        return {r["status"]: r["n"] for r in rows}

    async def orders(self, f: OrderFilter, now: datetime) -> tuple[list[Row], bool]:
        """One page of orders, most recently changed first, and whether more follow."""
        where: list[str] = ["TRUE"]
        params: dict[str, Any] = {}
        if f.status:
            where.append("status = :status")
            params["status"] = f.status
        if f.min_age_min:
            where.append("updated_at <= :before")
            params["before"] = now - timedelta(minutes=f.min_age_min)
        if f.customer:
            where.append("customer_id = :customer")
            params["customer"] = f.customer
        if f.conference:
            where.append("conference_id = :conference")
            params["conference"] = f.conference
        if f.q:
            # a transaction id may be of any attempt: payments' confirmations know them all
            txn_orders = await self._all(
                "payments",
                "SELECT DISTINCT order_id FROM confirmations WHERE transaction_id = :q",
                q=f.q,
            )
            where.append(
                "(order_id = :q OR payment_intent_id = :q OR transaction_id = :q"
                " OR order_id = ANY(:txn_orders))"
            )
            params["q"] = f.q
            params["txn_orders"] = [r["order_id"] for r in txn_orders]
        params["limit"] = PAGE_SIZE + 1
        params["offset"] = (max(f.page, 1) - 1) * PAGE_SIZE
        # fixed fragments only: every value is bound
        sql = (
            "SELECT order_id, customer_id, conference_id, status, reason, attempt, amount,"  # noqa: S608
            " currency, payment_intent_id, transaction_id, created_at, updated_at FROM orders"
            f" WHERE {' AND '.join(where)}"
            " ORDER BY updated_at DESC, order_id LIMIT :limit OFFSET :offset"
        )
        rows = await self._all("orders", sql, **params)
        return rows[:PAGE_SIZE], len(rows) > PAGE_SIZE
