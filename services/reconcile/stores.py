"""What ``paysaga reconcile`` reads of each service's own database: read-only, one
short autocommit connection per query, at the URLs of ``DatabaseSettings.url_for``.
With ``order_ids`` a read keeps the rows of those orders only."""

from __future__ import annotations

from typing import Any

import psycopg

from services.runtime.cli_outbox import DeadRow, dead_rows
from services.runtime.settings import SERVICES, DatabaseSettings, libpq_conninfo


def _rows(service: str, sql: str) -> list[Any]:
    url = DatabaseSettings().url_for(service)
    with (
        psycopg.connect(libpq_conninfo(url), autocommit=True) as conn,
        conn.cursor(row_factory=psycopg.rows.namedtuple_row) as cur,
    ):
        cur.execute(sql)
        return cur.fetchall()


def _of(order_ids: list[str] | None, order_id: str | None) -> bool:
    return not order_ids or order_id in order_ids


def _rows_of(order_ids: list[str] | None, service: str, sql: str) -> list[Any]:
    """``sql``'s rows whose ``order_id`` is one of ``order_ids`` (all without them)."""
    return [r for r in _rows(service, sql) if _of(order_ids, r.order_id)]


def orders(order_ids: list[str] | None) -> list[Any]:
    return _rows_of(
        order_ids,
        "orders",
        "SELECT order_id, status, attempt, transaction_id, amount, currency FROM orders",
    )


def captures() -> dict[str, str]:
    """Capture state by transaction."""
    rows = _rows("capture", "SELECT transaction_id, state FROM captures")
    return {r.transaction_id: r.state for r in rows}


def reservations() -> dict[tuple[str, int], str]:
    """Reservation state by (order, attempt)."""
    rows = _rows("inventory", "SELECT order_id, attempt, state FROM reservations")
    return {(r.order_id, r.attempt): r.state for r in rows}


def accepted_confirmations() -> set[str]:
    """The transactions whose confirmation payments accepted."""
    sql = "SELECT transaction_id FROM confirmations WHERE outcome = 'accepted'"
    return {r.transaction_id for r in _rows("payments", sql)}


def refunds() -> dict[str, str]:
    """Refund state by transaction."""
    sql = "SELECT transaction_id, state FROM compensations WHERE action = 'refund'"
    return {r.transaction_id: r.state for r in _rows("refunds", sql)}


def held_lines() -> list[Any]:
    """The lines of every reservation that holds stock."""
    return _rows("inventory", "SELECT lines FROM reservations WHERE state = 'reserved'")


def stock() -> list[Any]:
    return _rows("inventory", "SELECT sku, available, reserved, sold FROM stock")


def dead_outbox_rows(order_ids: list[str] | None) -> list[DeadRow]:
    """Every service's outbox rows Kafka refused for good."""
    return [r for service in SERVICES for r in dead_rows(service) if _of(order_ids, r.key)]


def unsettled_unmatched_refunds(order_ids: list[str] | None) -> list[Any]:
    """Unmatched payments whose operator void or refund is recorded but not settled."""
    return _rows_of(
        order_ids,
        "payments",
        "SELECT id, type, transaction_id, order_id, amount, currency, refund_key,"
        " refund_requested_at FROM unmatched_payments WHERE state = 'refund_pending' ORDER BY id",
    )


def failed_compensations(order_ids: list[str] | None) -> list[Any]:
    return _rows_of(
        order_ids,
        "refunds",
        "SELECT order_id, transaction_id, action, failure_reason FROM compensations"
        " WHERE state = 'failed' ORDER BY order_id, transaction_id, action",
    )


def rejected_confirmations(order_ids: list[str] | None) -> list[Any]:
    """One audit row per transaction whose confirmation (or unmatched payment) payments
    rejected."""
    return _rows_of(
        order_ids,
        "orders",
        "SELECT DISTINCT ON (transaction_id) transaction_id, order_id, reason"
        " FROM audit_log WHERE subject IN ('gateway_confirmation', 'unmatched_payment')"
        " AND outcome = 'rejected' AND transaction_id IS NOT NULL",
    )


def open_payment_requests(order_ids: list[str] | None) -> list[Any]:
    """Payment requests still ``requested``, each with its order's current attempt."""
    return _rows_of(
        order_ids,
        "payments",
        "SELECT r.order_id, r.attempt, r.payment_intent_id, o.status, o.attempt AS current,"
        " o.payment_intent_id AS current_intent"
        " FROM payment_requests r JOIN orders o USING (order_id)"
        " WHERE r.state = 'requested' ORDER BY r.order_id, r.attempt",
    )
