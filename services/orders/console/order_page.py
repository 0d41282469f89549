"""The reads of one order's page (``/console/orders/{order_id}``): everything each service
stored about it, and the gateway's record of its transactions beside ours."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

from services.orders.console.scrub import hide_secrets, scrub
from services.orders.console.sources import Row, Sources
from services.reconcile.rules import Violation, status_rules, total
from services.runtime.gateway_client import GatewayClient, GatewayError, GatewayNotFoundError


class OrderPageReads(Sources):
    """One order's page: its timeline and the gateway's ledger of it."""

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
        dead = await self._all_services(
            'SELECT consumer_group, topic, partition, "offset", error_class,'
            " error_message, attempts, dead_lettered_at, resolved_at, resolution"
            " FROM dead_letters WHERE order_key = :order_id ORDER BY id",
            **o,
        )
        for d in dead:
            d["error_message"] = scrub(d["error_message"])
        return {
            "order": found[0],
            "history": history,
            "audit": audit,
            "notifications": notifications(found[0]["notified"], notes),
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
    ) -> tuple[dict[str, dict[str, Any] | None], list[Violation], str | None]:
        """The gateway's record of each transaction (None: unknown to it), what
        ``reconcile``'s status rules say of the order against it, and why the gateway
        could not be asked (None when it answered)."""
        s = self._gateway
        payments: dict[str, dict[str, Any] | None] = {}
        try:
            async with GatewayClient(s.gateway_url, timeout_s=2, max_attempts=1) as gateway:
                for txn in transaction_ids:
                    try:
                        payments[txn] = hide_secrets(await gateway.get_payment(txn))
                    except GatewayNotFoundError:
                        payments[txn] = None
        except GatewayError as exc:
            return payments, [], f"the gateway did not answer ({type(exc).__name__})"
        view = SimpleNamespace(**order)
        return payments, status_rules([view], payments), None


def notifications(notified: list[list[Any]], rows: list[Row]) -> list[Row]:
    """The notifications the order requested: its projection's ``notified`` ([[attempt,
    kind], ...], kept for good), each with the times of its outbox row while the relay
    keeps that row (it prunes sent rows). A row carries the kind, not the attempt: the
    rows left of a kind are its latest attempts' (pruning takes the oldest first)."""
    times: dict[str, list[Row]] = {}
    for row in rows:
        try:
            kind = json.loads(row["value"])["payload"]["kind"]
        except (ValueError, KeyError, TypeError):
            continue
        times.setdefault(kind, []).append(row)
    out: list[Row] = [
        {"attempt": attempt, "kind": kind, "kept": False, "created_at": None, "sent_at": None}
        for attempt, kind in sorted((int(a), str(k)) for a, k in notified)
    ]
    for kind, kept in times.items():
        of_kind = [n for n in out if n["kind"] == kind]
        for n, row in zip(reversed(of_kind), reversed(kept), strict=False):
            n.update(created_at=row["created_at"], sent_at=row["sent_at"], kept=True)
    return out


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
