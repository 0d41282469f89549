"""A batch's writes, collected and written in one statement with its positions
(``deferred``): every row committed exactly when its transaction commits, in the order
written, never inside a savepoint that is rolled back, and each channel woken once —
on a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from aiokafka import TopicPartition
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import deferred, outbox, wakeup
from services.runtime.positions import save_positions
from services.runtime.tables import consumer_positions
from services.runtime.tables import outbox as outbox_table
from tests.conftest import Infra
from tests.integration.conftest import refunds_db

pytestmark = pytest.mark.asyncio

TP = TopicPartition("in.topic", 0)


async def _rows(engine: AsyncEngine) -> list[tuple[str, bytes]]:
    async with engine.connect() as conn:
        found = await conn.execute(
            select(outbox_table.c.topic, outbox_table.c.value).order_by(outbox_table.c.id)
        )
        return [(r.topic, r.value) for r in found]


async def _write(conn: AsyncConnection, *values: str) -> None:
    for v in values:
        await outbox.write_raw(conn, "out.topic", b"order-1", v.encode())


async def test_collected_rows_commit_with_the_positions_in_written_order(infra: Infra) -> None:
    async with (
        refunds_db(infra, "collect") as (engine, conninfo),
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listener,
    ):
        await listener.execute(f"LISTEN {outbox.OUTBOX_CHANNEL}")
        await listener.execute("LISTEN paysaga_other")
        async with engine.begin() as conn:
            deferred.defer(conn)
            await _write(conn, "a", "b", "c")
            # nothing written before the transaction's end
            assert (await conn.execute(select(outbox_table.c.id))).first() is None
            await wakeup.notify(conn, "paysaga_other")
            await wakeup.notify(conn, "paysaga_other")
            await save_positions(conn, "g", {TP: 7})
            assert len((await conn.execute(select(outbox_table.c.id))).all()) == 3
        assert await _rows(engine) == [
            ("out.topic", b"a"),
            ("out.topic", b"b"),
            ("out.topic", b"c"),
        ]
        async with engine.connect() as c:
            stored = await c.execute(select(consumer_positions.c.next_offset))
            assert stored.scalar_one() == 7
        notified = await _notifications(listener)
        # each channel once for the transaction
        assert sorted(notified) == sorted([outbox.OUTBOX_CHANNEL, "paysaga_other"])
        async with engine.begin() as conn:  # a transaction that does not defer: at once
            await _write(conn, "d")
            await wakeup.notify(conn, "paysaga_other")
            assert len((await conn.execute(select(outbox_table.c.id))).all()) == 4
        assert sorted(await _notifications(listener)) == sorted(
            [outbox.OUTBOX_CHANNEL, "paysaga_other"]
        )


async def test_rows_collected_are_lost_with_a_rollback_only(infra: Infra) -> None:
    async with refunds_db(infra, "collect") as (engine, _):

        async def failing_batch() -> None:
            async with engine.begin() as conn:
                deferred.defer(conn)
                await _write(conn, "never")
                await save_positions(conn, "g", {TP: 1})
                raise RuntimeError("the batch fails")

        with pytest.raises(RuntimeError):
            await failing_batch()
        # the next transaction on the pooled connection starts clean: nothing leaks into it
        async with engine.begin() as conn:
            await _write(conn, "plain")
        assert await _rows(engine) == [("out.topic", b"plain")]


async def test_rows_left_collected_are_written_at_commit(infra: Infra) -> None:
    """A deferring transaction that ends without storing positions still writes its
    rows — each column as it was given (a keyless row, headers that are a JSON list)."""
    async with refunds_db(infra, "collect") as (engine, _):
        async with engine.begin() as conn:
            deferred.defer(conn)
            await _write(conn, "x")
            await outbox.write_raw(conn, "out.topic", None, b"y", [("traceparent", "tp-1")])
        assert await _rows(engine) == [("out.topic", b"x"), ("out.topic", b"y")]
        async with engine.connect() as c:
            stored = await c.execute(
                select(outbox_table.c.key, outbox_table.c.headers).order_by(outbox_table.c.id)
            )
            assert [tuple(r) for r in stored] == [
                (b"order-1", []),
                (None, [["traceparent", "tp-1"]]),
            ]


async def test_a_savepoint_rolled_back_undoes_its_rows_only(infra: Infra) -> None:
    async with refunds_db(infra, "collect") as (engine, _):
        async with engine.begin() as conn:
            deferred.defer(conn)
            await _write(conn, "before")  # collected, written as the savepoint begins
            async with conn.begin_nested() as savepoint:
                await _write(conn, "inside-undone")
                await savepoint.rollback()
            async with conn.begin_nested():
                await _write(conn, "inside-kept")
            await _write(conn, "after")
            await save_positions(conn, "g", {TP: 3})
        assert await _rows(engine) == [
            ("out.topic", b"before"),
            ("out.topic", b"inside-kept"),
            ("out.topic", b"after"),
        ]


async def test_a_failing_collected_write_fails_the_commit(infra: Infra) -> None:
    """An error of a collected row surfaces when it is written: the transaction does
    not commit, its state change with it."""
    async with refunds_db(infra, "collect") as (engine, _):

        async def refused_row() -> None:
            async with engine.begin() as conn:
                deferred.defer(conn)
                await conn.execute(text("CREATE TABLE marker (v int)"))
                await conn.execute(
                    text("ALTER TABLE outbox ADD CONSTRAINT no_bad CHECK (topic <> 'bad')")
                )
                await outbox.write_raw(conn, "bad", None, b"v")

        with pytest.raises(Exception, match="outbox"):
            await refused_row()
        async with engine.connect() as c:
            missing = await c.execute(text("SELECT to_regclass('marker')"))
            assert missing.scalar() is None


async def _notifications(conn: psycopg.AsyncConnection[object]) -> list[str]:
    """The notifications that arrive within a second."""
    return [n.channel async for n in conn.notifies(timeout=1.0)]


async def test_a_collected_value_too_long_is_refused_not_cut_short(infra: Infra) -> None:
    """A collected string longer than its column fails the transaction, as a plain insert
    does — never stored cut to the column's length."""
    async with refunds_db(infra, "collect") as (engine, _):

        async def too_long() -> None:
            async with engine.begin() as conn:
                deferred.defer(conn)
                await outbox.write_raw(conn, "t" * 300, None, b"v")  # topic: varchar(249)
                await save_positions(conn, "g", {TP: 1})

        with pytest.raises(Exception, match="too long"):
            await too_long()
        assert await _rows(engine) == []
