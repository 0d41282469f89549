"""The orders projection reads a batch's orders once (``Projection.prepare``,
``store.prefetch``) and collects its writes (``deferred``): the same stored state and
emitted records as one event at a time, in a handful of statements for the batch — and
never a state that its own collected writes, a savepoint or another member's commit
made stale. On a real PostgreSQL, through the projection's handlers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.orders.handlers import OrdersMetrics, Projection
from services.runtime import deferred
from services.runtime.messages import Record
from services.runtime.positions import save_positions
from tests.conftest import Infra
from tests.integration.conftest import service_db
from tests.integration.test_orders_projection import CAPTURE, INVENTORY, PAYMENTS, Saga
from tests.support.batches import Routed, counted, records

pytestmark = pytest.mark.asyncio

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
TP = TopicPartition(PAYMENTS, 0)


class Applier(Routed):
    """The projection's handlers, called as the runtime calls them."""

    def __init__(self) -> None:
        self.projection = Projection(OrdersMetrics.create(CollectorRegistry()))
        super().__init__(self.projection.handlers(), NOW)

    async def batch(self, engine: AsyncEngine, records: list[Record]) -> None:
        """All of them in one deferring transaction, prepared, as a batch is."""
        async with engine.begin() as conn:
            deferred.defer(conn)
            await self.projection.prepare(conn, records)
            for rec in records:
                await self.apply(conn, rec)
            await save_positions(conn, "orders", {TP: len(records)})

    async def one_at_a_time(self, engine: AsyncEngine, records: list[Record]) -> None:
        for rec in records:
            async with engine.begin() as conn:
                deferred.defer(conn)
                await self.apply(conn, rec)
                await save_positions(conn, "orders", {TP: rec.offset + 1})


def authorization_path(saga: Saga, *, reserved_first: bool = False) -> list[tuple[str, str, bytes]]:
    key = saga.order_id
    registered, accepted = (PAYMENTS, key, saga.registered()), (PAYMENTS, key, saga.accepted())
    reserved = (INVENTORY, key, saga.reserved())
    rest = [(CAPTURE, key, saga.captured()), (INVENTORY, key, saga.committed())]
    if reserved_first:  # before its cause: held, then released by it
        return [registered, reserved, accepted, *rest]
    return [registered, accepted, reserved, *rest]


async def stored(engine: AsyncEngine) -> dict[str, list[Any]]:
    """What a user of the projection reads: views, applied events, history, held
    events, and the payloads emitted (event ids are new on each run)."""
    queries = {
        "orders": "SELECT * FROM orders ORDER BY order_id",
        "applied": "SELECT * FROM applied_events ORDER BY order_id, event_id",
        "history": "SELECT * FROM order_history ORDER BY order_id, version",
        "held": "SELECT order_id, event_id FROM held_events ORDER BY order_id, event_id",
    }
    found: dict[str, list[Any]] = {}
    async with engine.connect() as conn:
        for name, sql in queries.items():
            found[name] = [tuple(r) for r in await conn.execute(text(sql))]
        emitted = await conn.execute(text("SELECT topic, key, value FROM outbox ORDER BY id"))
        found["emitted"] = [(r.topic, r.key, json.loads(r.value)["payload"]) for r in emitted]
    return found


async def test_a_batch_reads_its_orders_once_and_stores_what_one_at_a_time_stores(
    infra: Infra,
) -> None:
    sagas = [Saga() for _ in range(4)]
    events = [e for s in sagas[:3] for e in authorization_path(s)]
    events += authorization_path(sagas[3], reserved_first=True)
    batch = records(*sorted(events, key=lambda e: e[1]))  # one order's events after another
    async with (
        service_db(infra, "orders", "batch") as (batched, _),
        service_db(infra, "orders", "single") as (single, _),
    ):
        with counted(batched) as sent:
            await Applier().batch(batched, batch)
        with counted(single) as sent_singly:
            await Applier().one_at_a_time(single, batch)
        result = await stored(batched)
        assert result == await stored(single)
        assert [r[2] for r in result["orders"]] == ["PAID_CONFIRMED"] * 4
        assert len(result["history"]) == 16
        assert result["held"] == []
        assert len([e for e in result["emitted"] if e[0] == "orders.status.v1"]) == 16
    # the batch: its orders locked, then read; the held event kept, read back and dropped;
    # everything else collected into the statement that stores the position
    assert len(sent) == 6, sent
    assert sum("pg_advisory_xact_lock" in s for s in sent) == 1
    # one at a time: a lock, a read and a write per event, at least
    assert len(sent_singly) >= 3 * len(batch)


class _Failed(Exception):
    pass


@pytest.mark.parametrize(
    ("fails", "history", "held"),
    [
        (False, ["PENDING_PAYMENT", "PAYMENT_AUTHORIZED", "INVENTORY_RESERVED"], []),
        (True, ["PENDING_PAYMENT"], ["StockReserved"]),
    ],
    ids=["released", "rolled_back"],
)
async def test_a_savepoint_makes_the_transaction_read_the_database_again(
    infra: Infra, fails: bool, history: list[str], held: list[str]
) -> None:
    """What a savepoint did is not in what the transaction knew before it — a blocked
    record applied in it, as a release applies one, or undone with it, as when a release
    dead-letters one that fails after its writes: the next event reads the order again,
    and finds its cause applied, or finds it missing and is held."""
    saga = Saga()
    registered, accepted, reserved, *_ = records(*authorization_path(saga))
    applier = Applier()
    async with service_db(infra, "orders", "savepoint") as (engine, _):
        async with engine.begin() as conn:
            deferred.defer(conn)
            await applier.projection.prepare(conn, [registered, accepted, reserved])
            await applier.apply(conn, registered)
            with contextlib.suppress(_Failed):  # as a release catches it
                async with conn.begin_nested():
                    await applier.apply(conn, accepted)
                    if fails:
                        raise _Failed("the released record fails after its writes")
            await applier.apply(conn, reserved)
            await save_positions(conn, "orders", {TP: 3})
        result = await stored(engine)
    assert [r[2] for r in result["history"]] == history
    assert [r[2] for r in result["orders"]] == history[-1:]
    assert result["held"] == [(saga.order_id, saga.ids[name]) for name in held]
    assert [e[2]["status"] for e in result["emitted"]] == history
    if fails:
        assert result["applied"] == [(saga.order_id, saga.ids["OrderRegistered"])]


async def test_a_batch_waits_for_the_order_and_reads_what_its_holder_committed(
    infra: Infra,
) -> None:
    """Two members' batches about one order: the second waits for the first's lock and
    then reads the state it committed (the read is a statement after the lock)."""
    saga = Saga()
    registered, accepted, *_ = records(*authorization_path(saga))
    applier = Applier()
    async with service_db(infra, "orders", "wait") as (engine, _):
        first_holds, first_may_commit = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with engine.begin() as conn:
                deferred.defer(conn)
                await applier.projection.prepare(conn, [registered])
                await applier.apply(conn, registered)
                first_holds.set()
                await first_may_commit.wait()
                await save_positions(conn, "orders", {TP: 1})

        async def second() -> None:
            await first_holds.wait()
            await applier.batch(engine, [accepted])

        first_task = asyncio.create_task(first())
        second_task = asyncio.create_task(second())
        await first_holds.wait()
        async with engine.connect() as conn:  # the second batch waits on the order's lock

            async def second_waits() -> bool:
                found = await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    )
                )
                return bool(found.scalar_one())

            deadline = asyncio.get_running_loop().time() + 20
            while not await second_waits():
                assert asyncio.get_running_loop().time() < deadline, "the second never waited"
                await asyncio.sleep(0.05)
        first_may_commit.set()
        await asyncio.wait_for(asyncio.gather(first_task, second_task), 30)
        result = await stored(engine)
    assert [r[2] for r in result["orders"]] == ["PAYMENT_AUTHORIZED"]
    assert [r[2] for r in result["history"]] == ["PENDING_PAYMENT", "PAYMENT_AUTHORIZED"]
