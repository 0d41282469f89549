"""Opening an attempt reads its intent's unmatched payments — the parked ones and the ones
an operator gave back — through the intent index, never by scanning the unmatched store,
which only grows (resolved rows are kept): each new order would cost a scan of all of it.

Real PostgreSQL: a database at the payments schema with a few thousand unmatched rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.payments import unmatched_store
from tests.conftest import Infra
from tests.integration.conftest import service_db
from tests.support.harness import query
from tests.support.payments import make_order

pytestmark = pytest.mark.integration

_ROW = (
    "INSERT INTO unmatched_payments (gateway, gateway_event_id, type, transaction_id,"
    " payment_intent_id, amount, currency, payment_method_type, received_at, state)"
    " SELECT 'stripe', 'evt_' || i, 'payment.authorized', 'txn_' || i, 'pi_' || i, 1000,"
    " 'EUR', 'card', now(), %s FROM generate_series(%s::int, %s::int) AS i RETURNING 1"
)


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with service_db(infra, "payments", "unmatched_intent") as found:
        yield found


async def _plans(conn: AsyncConnection, statements: list[tuple[str, Any]]) -> list[str]:
    """EXPLAIN of each recorded read of the unmatched store, with its parameters."""
    plans = []
    for sql, params in statements:
        if sql.lstrip().upper().startswith("SELECT") and "unmatched_payments" in sql:
            rows = await conn.exec_driver_sql(f"EXPLAIN {sql}", params)
            plans.append("\n".join(r[0] for r in rows))
    return plans


async def test_opening_an_attempt_reads_its_unmatched_payments_by_intent_in_every_state(
    db: tuple[AsyncEngine, str],
) -> None:
    engine, conninfo = db
    query(conninfo, _ROW, "resolved_order", 1, 3000)
    query(conninfo, _ROW, "parked", 3001, 3001)  # pi_3001: matchable
    query(conninfo, _ROW, "resolved_refund", 3002, 3002)  # pi_3002: given back
    statements: list[tuple[str, Any]] = []
    async with engine.begin() as conn:
        await conn.exec_driver_sql("ANALYZE unmatched_payments")  # the plans of a live store

        def record(_c: object, _cur: object, sql: str, params: Any, *_: object) -> None:
            statements.append((sql, params))

        event.listen(conn.sync_connection, "before_cursor_execute", record)
        parked = await unmatched_store.load_unmatched_of(
            conn, make_order(payment_intent_id="pi_3001")
        )
        refunded = await unmatched_store.load_unmatched_of(
            conn, make_order(payment_intent_id="pi_3002")
        )
        event.remove(conn.sync_connection, "before_cursor_execute", record)
        plans = await _plans(conn, statements)

    assert [c.transaction_id for c in parked.matchable] == ["txn_3001"]
    assert parked.given_back == []
    assert refunded.matchable == []
    assert [r.transaction_id for r in refunded.given_back] == ["txn_3002"]
    assert len(plans) == 2  # one read per attempt opened, the parked and the given back
    for plan in plans:
        assert "ix_unmatched_intent" in plan, plan
        assert "Seq Scan" not in plan, plan
