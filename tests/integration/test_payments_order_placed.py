"""payments registers an OrderPlaced by inserting it at once and decides on the stored
order only when the order is known already: the same content again is a duplicate that
emits nothing, other content for the same id is refused, and two members placing one
order at the same time register it once. Real PostgreSQL, the payments handler."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.devclient import order_placed
from services.payments import orders
from services.payments.metrics import Metrics
from services.runtime import deferred
from services.runtime.messages import Context, Record
from tests.conftest import Infra
from tests.integration.conftest import service_db

pytestmark = pytest.mark.asyncio

WINDOW = timedelta(minutes=10)


async def place(engine: AsyncEngine, value: bytes, metrics: Metrics) -> None:
    rec = Record("checkout.orders.v1", 0, 0, b"ord_1", value, (), 0)
    async with engine.begin() as conn:
        deferred.defer(conn)
        ctx = Context(conn=conn, record=rec, envelope=json.loads(value), now=datetime.now(UTC))
        await orders.on_order_placed(ctx, metrics, WINDOW)


async def stored(engine: AsyncEngine) -> tuple[list[tuple[object, ...]], list[str]]:
    """The orders rows (id, total, attempt, status) and the event types emitted."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT order_id, total_amount, attempt, status FROM orders ORDER BY order_id")
        )
        emitted = await conn.execute(
            text("SELECT topic, value FROM outbox WHERE topic = 'payments.events.v1' ORDER BY id")
        )
        types = [json.loads(r.value)["event_type"] for r in emitted]
        return [tuple(r) for r in rows], types


def outcomes(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for m in metrics.orders.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }


async def test_a_known_order_is_a_duplicate_or_refused_and_changes_nothing(infra: Infra) -> None:
    metrics = Metrics.create(CollectorRegistry())
    first = order_placed("ord_1", "pi_1", [("TICKET-STD", 2, 2500)])
    async with service_db(infra, "payments", "placed") as (engine, _):
        await place(engine, first, metrics)
        await place(engine, first, metrics)  # a redelivery under a new event id: same content
        await place(engine, order_placed("ord_1", "pi_1", [("TICKET-STD", 3, 2500)]), metrics)
        rows, emitted = await stored(engine)
    assert rows == [("ord_1", 5000, 1, "pending")]
    assert emitted == ["OrderRegistered"]
    assert outcomes(metrics) == {"registered": 1.0, "duplicate": 1.0, "rejected": 1.0}


async def test_one_order_placed_by_two_members_at_once_is_registered_once(infra: Infra) -> None:
    metrics = Metrics.create(CollectorRegistry())
    value = order_placed("ord_1", "pi_1", [("TICKET-STD", 2, 2500)])
    async with service_db(infra, "payments", "placed_twice") as (engine, _):
        await asyncio.gather(*(place(engine, value, metrics) for _ in range(4)))
        rows, emitted = await stored(engine)
    assert rows == [("ord_1", 5000, 1, "pending")]
    assert emitted == ["OrderRegistered"]
    assert outcomes(metrics) == {"registered": 1.0, "duplicate": 3.0}


async def test_an_order_locks_its_intent_as_it_is_inserted_and_matches_a_payment_parked_meanwhile(
    infra: Infra,
) -> None:
    """The statement that inserts an order with a payment intent takes the intent's lock
    too (no statement of its own): a confirmation that holds the lock and parks the
    intent's payment meanwhile is waited for, and the order's read of its unmatched
    payments — a statement after the lock — sees it and matches it."""
    metrics = Metrics.create(CollectorRegistry())
    value = order_placed("ord_1", "pi_1", [("TICKET-STD", 2, 2500)])
    async with service_db(infra, "payments", "placed_lock") as (engine, _):
        statements: list[str] = []

        def seen(_c: object, _cur: object, sql: str, *_: object) -> None:
            statements.append(sql)

        async with engine.connect() as confirmation:
            await confirmation.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:n, 0))"),
                {"n": "payments:intent:pi_1"},
            )
            await confirmation.execute(text(_PARKED))
            event.listen(engine.sync_engine, "before_cursor_execute", seen)
            placing = asyncio.create_task(place(engine, value, metrics))
            deadline = asyncio.get_running_loop().time() + 10
            while not await _waits_for_an_advisory_lock(confirmation):
                assert asyncio.get_running_loop().time() < deadline, "no wait for the lock"
                assert not placing.done(), "the order did not wait for the intent's lock"
                await asyncio.sleep(0.05)
            await confirmation.commit()
        await asyncio.wait_for(placing, 10)
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
        rows, emitted = await stored(engine)
        async with engine.connect() as conn:
            states = (await conn.execute(text("SELECT state FROM unmatched_payments"))).all()
    assert [r[0] for r in rows] == ["ord_1"]
    assert emitted == ["OrderRegistered", "PaymentAccepted"], emitted
    assert [s for (s,) in states] == ["matched"]
    assert not [s for s in statements if s.lstrip().startswith("SELECT pg_advisory_xact_lock")]


_PARKED = (
    "INSERT INTO unmatched_payments (gateway, gateway_event_id, type, transaction_id,"
    " payment_intent_id, order_id, amount, currency, payment_method_type, received_at, state)"
    " VALUES ('simgw', 'evt_1', 'payment.authorized', 'txn_1', 'pi_1', 'ord_1', 5000, 'EUR',"
    " 'card', now(), 'parked')"
)


async def _waits_for_an_advisory_lock(conn: AsyncConnection) -> bool:
    waiting = await conn.scalar(
        text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    )
    return bool(waiting)
