"""Every read of the operator console across service databases: the one place where
the orders service looks at another service's tables.

Each service owns its database; the console only reads them, in read-only
transactions, through the URLs of ``DatabaseSettings.url_for`` (the same settings every
service and ``paysaga reconcile`` use). Nothing here writes: the console's actions go
through the CLI's code (``services/orders/console/actions.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.carddata import redact
from services import reconcile
from services.reconcile.rules import status_rules, total
from services.runtime import dlq
from services.runtime.cli_dlq import Filters, read_dead_letters, ref_of
from services.runtime.gateway_client import GatewayClient, GatewayError, GatewayNotFoundError
from services.runtime.service import make_engine
from services.runtime.settings import DatabaseSettings, GatewayClientSettings

PAGE_SIZE = 50
FINAL = ("PAID_CONFIRMED", "REFUNDED", "PAYMENT_FAILED")
#: keys whose values a page never shows, at any depth of a payload (card data is
#: redacted by ``schemas.carddata.redact`` before this)
_SECRET_KEY = re.compile(r"secret|password|token|authorization", re.IGNORECASE)

Row = dict[str, Any]


def scrub(value: bytes | str) -> str:
    """A payload or header as a page may show it: card data redacted, secrets hidden."""
    text_ = redact(value.decode("utf-8", "replace") if isinstance(value, bytes) else value).text
    try:
        doc = json.loads(text_)
    except ValueError:
        return text_
    return json.dumps(_hide_secrets(doc), indent=2, ensure_ascii=False)


def _hide_secrets(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {
            k: "[hidden]" if _SECRET_KEY.search(str(k)) else _hide_secrets(v)
            for k, v in doc.items()
        }
    if isinstance(doc, list):
        return [_hide_secrets(v) for v in doc]
    return doc


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


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    ref: str
    group: str
    error_class: str
    error_message: str
    original: str
    key: str
    attempts: str
    first_failure: str
    headers: dict[str, str]
    payload: str
    #: "open", or how the service's dead_letters row was resolved
    state: str


class ConsoleReads:
    """Read-only views over the five service databases, Kafka's dead-letter topics and
    the gateway. ``orders`` is the service's own engine; the others are opened lazily,
    one small pool each."""

    def __init__(
        self,
        orders: AsyncEngine,
        db: DatabaseSettings,
        bootstrap: str,
        gateway: GatewayClientSettings,
        stall_after_s: float,
    ) -> None:
        self._engines: dict[str, AsyncEngine] = {"orders": orders}
        self._db = db
        self._bootstrap = bootstrap
        self._gateway = gateway
        self.stall_after_s = stall_after_s

    @contextlib.asynccontextmanager
    async def _read(self, service: str) -> AsyncIterator[AsyncConnection]:
        engine = self._engines.get(service)
        if engine is None:
            engine = self._engines[service] = make_engine(self._db.url_for(service), pool_size=1)
        async with engine.connect() as conn:
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            yield conn

    async def _all(self, service: str, sql: str, **params: Any) -> list[Row]:
        async with self._read(service) as conn:
            return [dict(r) for r in (await conn.execute(text(sql), params)).mappings()]

    async def close(self) -> None:
        for name, engine in self._engines.items():
            if name != "orders":
                await engine.dispose()

    # ---------------------------------------------------------------- orders

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

    async def timeline(self, order_id: str) -> dict[str, Any] | None:
        """Everything each service stored about one order."""
        found = await self._all("orders", "SELECT * FROM orders WHERE order_id = :o", o=order_id)
        if not found:
            return None
        o = {"order_id": order_id}
        history, audit, notes, confirmations, requests, unmatched = await asyncio.gather(
            self._all(
                "orders",
                "SELECT version, status, reason, at FROM order_history"
                " WHERE order_id = :order_id ORDER BY version",
                **o,
            ),
            self._all(
                "orders",
                "SELECT occurred_at, subject, action, outcome, reason, transaction_id, details"
                " FROM audit_log WHERE order_id = :order_id ORDER BY occurred_at, id",
                **o,
            ),
            self._all(
                "orders",
                "SELECT created_at, sent_at, value FROM outbox"
                " WHERE topic = 'customer.notifications.v1' AND key = :key ORDER BY id",
                key=order_id.encode(),
            ),
            self._all(
                "payments",
                "SELECT attempt, type, outcome, transaction_id, payment_intent_id, amount,"
                " currency, payment_method_type, brand, last4, gateway, gateway_event_id,"
                " received_at, stored_at FROM confirmations WHERE order_id = :order_id"
                " ORDER BY stored_at, id",
                **o,
            ),
            self._all(
                "payments",
                "SELECT attempt, state, payment_intent_id, amount, currency, attempts,"
                " outcome_reason, last_error, created_at, updated_at FROM payment_requests"
                " WHERE order_id = :order_id ORDER BY attempt",
                **o,
            ),
            self._all(
                "payments",
                "SELECT id, type, transaction_id, amount, currency, state, resolution,"
                " parked_at FROM unmatched_payments WHERE order_id = :order_id ORDER BY id",
                **o,
            ),
        )
        reservations, captures, compensations = await asyncio.gather(
            self._all(
                "inventory",
                "SELECT attempt, transaction_id, state, lines, short_skus, created_at,"
                " updated_at FROM reservations WHERE order_id = :order_id ORDER BY created_at",
                **o,
            ),
            self._intents("capture", "captures", "capture_id, outcome_reason", order_id),
            self._intents(
                "refunds",
                "compensations",
                "action, reason, refund_id, failure_reason",
                order_id,
            ),
        )
        dead = []
        for service in ("payments", "inventory", "capture", "refunds", "orders"):
            dead += [
                {"service": service, **r}
                for r in await self._all(
                    service,
                    'SELECT consumer_group, topic, partition, "offset", error_class,'
                    " error_message, attempts, dead_lettered_at, resolved_at, resolution"
                    " FROM dead_letters WHERE order_key = :order_id ORDER BY id",
                    **o,
                )
            ]
        for d in dead:
            d["error_message"] = scrub(d["error_message"])
        return {
            "order": found[0],
            "history": history,
            "audit": audit,
            "notifications": [_notification(n) for n in notes],
            "confirmations": confirmations,
            "requests": requests,
            "unmatched": unmatched,
            "reservations": reservations,
            "captures": captures,
            "compensations": compensations,
            "dead_letters": dead,
        }

    async def _intents(self, service: str, table: str, extra: str, order_id: str) -> list[Row]:
        return await self._all(
            service,
            f"SELECT transaction_id, idempotency_key, amount, currency, state, attempts,"  # noqa: S608
            f" next_attempt_at, last_error, created_at, updated_at, {extra} FROM {table}"
            " WHERE order_id = :order_id ORDER BY created_at",
            order_id=order_id,
        )

    async def ledger(
        self, order: Row, transaction_ids: list[str]
    ) -> tuple[dict[str, dict[str, Any] | None], list[reconcile.Violation], str | None]:
        """The gateway's record of each transaction (None: unknown to it), what
        ``reconcile``'s status rules say of the order against it, and why the gateway
        could not be asked (None when it answered)."""
        s = self._gateway
        payments: dict[str, dict[str, Any] | None] = {}
        try:
            async with GatewayClient(s.gateway_url, timeout_s=2, max_attempts=1) as gateway:
                for txn in transaction_ids:
                    try:
                        payments[txn] = _hide_secrets(await gateway.get_payment(txn))
                    except GatewayNotFoundError:
                        payments[txn] = None
        except GatewayError as exc:
            return payments, [], f"the gateway did not answer ({type(exc).__name__})"
        view = SimpleNamespace(**order)
        return payments, status_rules([view], payments), None

    # ---------------------------------------------------------------- operator lists

    async def stalled(self, now: datetime) -> list[Row]:
        """Orders not final and unchanged for ``stall_after_s`` (the monitor's
        deadline), oldest first; NEEDS_RECONCILIATION ones at once."""
        return await self._all(
            "orders",
            "SELECT order_id, customer_id, status, reason, amount, currency, updated_at"
            " FROM orders WHERE status = 'NEEDS_RECONCILIATION'"
            " OR (status <> ALL(:final) AND updated_at <= :before)"
            " ORDER BY updated_at LIMIT 500",
            final=list(FINAL),
            before=now - timedelta(seconds=self.stall_after_s),
        )

    async def needs_reconciliation(self) -> tuple[list[Row], list[reconcile.Violation], str]:
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

    async def dead_letters(self, filters: Filters) -> list[DeadLetter]:
        """Dead letters from Kafka (as ``paysaga dlq list``), with whether each is still
        open in its service's database."""
        recs = await read_dead_letters(self._bootstrap, filters)
        states: dict[tuple[str, str, int, int], str] = {}
        for service in ("payments", "inventory", "capture", "refunds", "orders"):
            for r in await self._all(
                service,
                'SELECT consumer_group, topic, partition, "offset", resolution, resolved_at'
                " FROM dead_letters",
            ):
                key = (r["consumer_group"], r["topic"], r["partition"], r["offset"])
                states[key] = (r["resolution"] or "resolved") if r["resolved_at"] else "open"
        out = []
        for rec in recs:
            h = dlq.header_dict(rec.headers)
            original = (h.get(dlq.H_GROUP, "?"), h.get(dlq.H_TOPIC, "?"))
            where = (*original, int(h.get(dlq.H_PARTITION, -1)), int(h.get(dlq.H_OFFSET, -1)))
            out.append(
                DeadLetter(
                    ref=ref_of(rec),
                    group=original[0],
                    error_class=h.get(dlq.H_ERROR_CLASS, "?"),
                    error_message=scrub(h.get(dlq.H_ERROR_MESSAGE, "")),
                    original=f"{where[1]}:{where[2]}:{where[3]}",
                    key=scrub(rec.key_str or ""),
                    attempts=h.get(dlq.H_ATTEMPTS, "?"),
                    first_failure=h.get(dlq.H_FIRST_FAILURE, "?"),
                    headers={k: scrub(v) for k, v in h.items()},
                    payload=scrub(rec.value),
                    state=states.get(where, "unknown"),
                )
            )
        return out


def _notification(row: Row) -> Row:
    try:
        envelope = json.loads(row["value"])
        payload = envelope.get("payload", {})
    except ValueError:
        payload = {}
    return {
        "created_at": row["created_at"],
        "sent_at": row["sent_at"],
        "kind": payload.get("kind", "?"),
        "attempt": payload.get("attempt"),
    }


def utcnow() -> datetime:
    return datetime.now(UTC)


def compare_ledger(
    t: dict[str, Any], ledger: dict[str, dict[str, Any] | None]
) -> list[dict[str, Any]]:
    """Our record of each transaction beside the gateway's: captured, refunded, voided
    (``differs`` marks a disagreement)."""
    out = []
    for txn, p in ledger.items():
        # a sale is captured by the gateway itself: its accepted confirmation is our record
        ours_captured = sum(
            c["amount"]
            for c in t["captures"]
            if c["transaction_id"] == txn and c["state"] in ("captured", "sale_confirmed")
        ) or sum(
            c["amount"]
            for c in t["confirmations"]
            if c["transaction_id"] == txn
            and c["type"] == "payment.captured"
            and c["outcome"] == "accepted"
        )
        ours_refunded = sum(
            c["amount"]
            for c in t["compensations"]
            if c["transaction_id"] == txn and c["action"] == "refund" and c["state"] == "succeeded"
        )
        ours_voided = any(
            c["transaction_id"] == txn and c["action"] == "void" and c["state"] == "succeeded"
            for c in t["compensations"]
        )
        theirs: dict[str, Any] = {"captured": None, "refunded": None, "voided": None}
        if p is not None:
            theirs = {
                "captured": total(p.get("captures")),
                "refunded": total(p.get("refunds")),
                "voided": p.get("state") == "voided" or bool(p.get("voids")),
            }
        ours = {"captured": ours_captured, "refunded": ours_refunded, "voided": ours_voided}
        for field in ("captured", "refunded", "voided"):
            out.append(
                {
                    "transaction_id": txn,
                    "field": field,
                    "ours": ours[field],
                    "gateway": "unknown to the gateway" if p is None else theirs[field],
                    "state": None if p is None else p.get("state"),
                    "differs": p is None or ours[field] != theirs[field],
                }
            )
    return out
