"""Connections kept between units of work (``services.runtime.kept``), on a real
PostgreSQL: one connection serves unit after unit while its owner runs; a failed unit
leaves nothing behind on it (rolled back, the connection given back and a fresh one
checked out next); a connection the server ended fails one unit and the next one
succeeds; once the owner stops nothing stays checked out; an autocommit keeper commits
each statement at once."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import driver
from services.runtime.errors import is_transient
from services.runtime.kept import KeptConnections
from tests.conftest import Infra
from tests.integration.conftest import INBOX_INSERT as _INSERT
from tests.integration.conftest import inbox_keys as _keys
from tests.integration.conftest import refunds_db

pytestmark = pytest.mark.asyncio


async def _backend(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


def _checked_out(engine: AsyncEngine) -> int:
    return engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]


async def test_one_connection_serves_the_units_while_running_and_none_stays_out(
    infra: Infra,
) -> None:
    async with refunds_db(infra, "kept_reuse") as (engine, _):
        kept = KeptConnections(engine)
        async with kept.while_running():
            backends = []
            for i in range(3):
                async with kept.begin() as conn:
                    backends.append(await _backend(conn))
                    await driver.execute(conn, _INSERT, {"group": "g", "key": f"k{i}"})
                assert _checked_out(engine) == 1  # kept, between units
            assert len(set(backends)) == 1
        assert _checked_out(engine) == 0
        assert await _keys(engine) == ["k0", "k1", "k2"]
        # outside while_running a unit gives its connection back at once
        async with kept.begin() as conn:
            await driver.execute(conn, _INSERT, {"group": "g", "key": "k3"})
        assert _checked_out(engine) == 0
        assert "k3" in await _keys(engine)


async def test_a_failed_unit_is_rolled_back_and_the_next_runs_on_a_fresh_connection(
    infra: Infra,
) -> None:
    async with refunds_db(infra, "kept_failed") as (engine, _):
        kept = KeptConnections(engine)
        async with kept.while_running():
            async with kept.begin() as conn:
                first = await _backend(conn)

            async def failing_handler() -> None:
                async with kept.begin() as conn:
                    assert await _backend(conn) == first
                    await driver.execute(conn, _INSERT, {"group": "g", "key": "undone"})
                    raise RuntimeError("the handler failed")

            async def failing_statement() -> None:
                async with kept.begin() as conn:
                    await driver.execute(conn, _INSERT, {"group": "g", "key": "dup"})
                    await driver.execute(conn, _INSERT, {"group": "g", "key": "dup"})

            with pytest.raises(RuntimeError):
                await failing_handler()
            assert _checked_out(engine) == 0  # given back, not kept
            # a unit whose statement failed: nothing of it stays, the next one works
            with pytest.raises(sqlalchemy.exc.IntegrityError):
                await failing_statement()
            async with kept.begin() as conn:
                await driver.execute(conn, _INSERT, {"group": "g", "key": "after"})
        assert await _keys(engine) == ["after"]


async def test_a_database_restart_fails_one_unit_not_one_per_kept_connection(
    infra: Infra,
) -> None:
    async with refunds_db(infra, "kept_broken") as (engine, conninfo):
        kept = KeptConnections(engine)
        other = KeptConnections(engine, autocommit=True)  # another loop's (a worker's)
        async with kept.while_running(), other.while_running():
            # two units side by side (a consumer's lanes) leave two connections kept
            async with kept.begin() as a, kept.begin() as b:
                pids = [await _backend(a), await _backend(b)]
            async with other.autocommit() as c:
                pids.append(await _backend(c))
            assert _checked_out(engine) == 3
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as killer:
                await killer.execute(
                    "SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) p", [pids]
                )
            with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
                async with kept.begin() as conn:
                    await driver.execute(conn, _INSERT, {"group": "g", "key": "lost"})
            assert raised.value.connection_invalidated
            assert is_transient(raised.value)
            # the pool was renewed: the other kept connections are not handed out again
            async with kept.begin() as conn:
                assert await _backend(conn) not in pids
                await driver.execute(conn, _INSERT, {"group": "g", "key": "retried"})
            async with other.autocommit() as conn:
                assert await _backend(conn) not in pids
                await driver.execute(conn, _INSERT, {"group": "g", "key": "worker"})
        assert await _keys(engine) == ["retried", "worker"]
        assert _checked_out(engine) == 0


async def test_an_autocommit_keeper_commits_each_statement(infra: Infra) -> None:
    async with refunds_db(infra, "kept_autocommit") as (engine, _):
        kept = KeptConnections(engine, autocommit=True)
        async with kept.while_running():

            async def failing_after_two_statements() -> None:
                async with kept.autocommit() as conn:
                    await driver.execute(conn, _INSERT, {"group": "g", "key": "a"})
                    # through SQLAlchemy too: it begins a transaction of its own (no BEGIN)
                    await conn.execute(
                        text("INSERT INTO inbox (consumer_group, dedupe_key) VALUES ('g', 'b')")
                    )
                    raise RuntimeError("after both statements")

            with pytest.raises(RuntimeError):
                await failing_after_two_statements()
            async with kept.autocommit() as conn:
                pid = await _backend(conn)
            async with kept.autocommit() as conn:
                assert not conn.in_transaction()  # the last unit's was ended
                assert await _backend(conn) == pid  # kept once the unit ended cleanly
        assert await _keys(engine) == ["a", "b"]  # each committed as it ran
        assert _checked_out(engine) == 0
