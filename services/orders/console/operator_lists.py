"""The reads of the operator lists: stalled orders (``/console/stalled``), orders that need
reconciliation (``/console/reconciliation``) and unmatched payments
(``/console/unmatched``)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import httpx

from services import reconcile
from services.monitor.domain import OPEN
from services.orders.console.sources import Row, Sources
from services.reconcile.rules import Violation


class OperatorListReads(Sources):
    """The stalled, needs-reconciliation and unmatched lists."""

    async def stalled(self, now: datetime) -> list[Row]:
        """Orders unchanged for their status's deadline (the monitor's ``Deadlines``),
        oldest first."""
        return await self._all(
            "orders",
            "SELECT order_id, customer_id, o.status, reason, amount, currency, updated_at"
            " FROM orders o JOIN unnest(CAST(:statuses AS text[]),"
            " CAST(:befores AS timestamptz[])) AS d(status, before) ON o.status = d.status"
            " WHERE o.updated_at <= d.before ORDER BY updated_at LIMIT 500",
            statuses=[s.value for s in OPEN],
            befores=[now - timedelta(seconds=self.deadlines.for_status(s)) for s in OPEN],
        )

    async def needs_reconciliation(self) -> tuple[list[Row], list[Violation], str]:
        """NEEDS_RECONCILIATION orders, what ``paysaga reconcile --gateway --order ...``
        says of them (its code, in a thread: it reads with blocking connections), and
        which check that was (without the gateway when the gateway does not answer)."""
        rows = await self._all(
            "orders",
            "SELECT order_id, customer_id, reason, amount, currency, transaction_id, updated_at"
            " FROM orders WHERE status = 'NEEDS_RECONCILIATION' ORDER BY updated_at LIMIT 100",
        )
        ids = [r["order_id"] for r in rows]
        command = "paysaga reconcile --gateway --order ..."
        if not rows:
            return rows, [], command
        try:
            found = await asyncio.to_thread(reconcile.check, self._gateway.gateway_url, ids)
        except httpx.HTTPError as exc:
            found = await asyncio.to_thread(reconcile.check, None, ids)
            command = f"paysaga reconcile --order ... (the gateway did not answer: {exc!r})"
        return rows, found, command

    async def unmatched(self) -> list[Row]:
        """Open unmatched payments, each with the pending orders of its amount and
        currency that it could belong to."""
        rows = await self._all(
            "payments",
            "SELECT id, type, transaction_id, payment_intent_id, order_id, amount, currency,"
            " brand, last4, state, refund_key, parked_at FROM unmatched_payments"
            " WHERE state IN ('parked', 'refund_pending') ORDER BY id LIMIT 200",
        )
        for r in rows:
            r["candidates"] = await self._all(
                "orders",
                "SELECT order_id, customer_id, payment_intent_id, updated_at FROM orders"
                " WHERE status = 'PENDING_PAYMENT' AND amount = :amount AND currency = :currency"
                " ORDER BY updated_at DESC LIMIT 10",
                amount=r["amount"],
                currency=r["currency"],
            )
        return rows

    async def unmatched_one(self, unmatched_id: int) -> Row | None:
        rows = [r for r in await self.unmatched() if r["id"] == unmatched_id]
        return rows[0] if rows else None
