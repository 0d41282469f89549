"""A confirmation or order record that payments cannot process even after its retries
(its database stayed unavailable) is dead-lettered by the runtime, which then runs
payments' hook in the dead-letter transaction: the order is flagged for reconciliation
and never left looking merely pending (the projection maps the event to
NEEDS_RECONCILIATION)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from services.payments import store
from services.payments.domain import Item, Order
from services.payments.handlers import PaymentsHandlers
from services.payments.metrics import Metrics
from services.runtime import migrate
from services.runtime.messages import Record
from services.runtime.service import make_engine
from tests.conftest import Infra
from tests.support.harness import query, uid

pytestmark = pytest.mark.integration


@pytest.fixture
def payments_db(infra: Infra) -> Iterator[str]:
    name = f"paysaga_payments_dl_{uid('')}"
    with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate.upgrade("payments", infra.db_url(name))
    yield name
    with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def record(key: str | None) -> Record:
    return Record("gateway.confirmations.v1", 2, 41, key.encode() if key else None, b"{}", (), 0)


@pytest.mark.parametrize("keyed_by", ["order_id", "payment_intent_id", "unknown"])
def test_dead_lettered_record_flags_its_order(
    infra: Infra, payments_db: str, keyed_by: str
) -> None:
    order = Order(
        uid("ord_"),
        "cust",
        "EUR",
        1000,
        uid("pi_"),
        "card",
        1,
        "accepted",
        (Item("sku", 1),),
        None,
        "h",
    )
    handlers = PaymentsHandlers(
        {"simgw": ["s"]}, 300, timedelta(hours=24), Metrics.create(CollectorRegistry())
    )
    key = {"order_id": order.order_id, "payment_intent_id": order.payment_intent_id}.get(keyed_by)

    async def run() -> None:
        engine = make_engine(infra.db_url(payments_db))
        try:
            async with engine.begin() as conn:
                await store.insert_order(conn, order)
            async with engine.begin() as conn:
                await handlers.flag_dead_letter(conn, record(key or "nobody"), TimeoutError())
        finally:
            await engine.dispose()

    asyncio.run(run())
    conninfo = infra.conninfo(payments_db)
    status = query(conninfo, "SELECT status FROM orders WHERE order_id = %s", order.order_id)
    events = [json.loads(bytes(v)) for (v,) in query(conninfo, "SELECT value FROM outbox")]
    if keyed_by == "unknown":
        assert status == [("accepted",)]
        assert events == []
        return
    assert status == [("flagged",)]
    assert [(e["event_type"], e["payload"]) for e in events] == [
        (
            "OrderFlaggedForReconciliation",
            {"order_id": order.order_id, "attempt": 1, "reason": "record_dead_lettered"},
        )
    ]
    assert events[0]["saga_seq"] == 1
