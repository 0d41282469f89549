"""The relay's read of its unsent rows: exactly the rows no dead row of their key holds
back, in id order, and at a cost in proportion to the rows however far it has fallen
behind and however many keys are dead. PostgreSQL once served "not behind a dead row of
its key" by looking each unsent row up through the index of unsent rows and filtering
them all, n² entries a pass, so a relay that fell behind fell further behind. Counted in
buffers (EXPLAIN ANALYZE), not timed.

Real PostgreSQL (a database of the refunds schema)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.relay import _UNSENT_SQL
from tests.conftest import Infra
from tests.integration.conftest import refunds_db

pytestmark = pytest.mark.integration

LIMIT = 500


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with refunds_db(infra, "relayplan") as found:
        yield found


def unsent(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], int]:
    """The relay's read (its rows) and the buffers it cost."""
    explained = conn.execute(
        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {_UNSENT_SQL.sql}", {"limit": LIMIT}
    ).fetchone()
    assert explained is not None
    plan = (explained[0] if isinstance(explained[0], list) else json.loads(explained[0]))[0]
    top = plan["Plan"]
    read = int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))
    return conn.execute(_UNSENT_SQL.sql, {"limit": LIMIT}).fetchall(), read


def add(conn: psycopg.Connection[Any], key: str | None, *, dead: bool = False) -> int:
    row = conn.execute(
        "INSERT INTO outbox (topic, key, value, dead_at, dead_error) VALUES"
        " ('t', %s, '{}', CASE WHEN %s THEN now() END, CASE WHEN %s THEN 'too large' END)"
        " RETURNING id",
        (None if key is None else key.encode(), dead, dead),
    ).fetchone()
    assert row is not None
    return int(row[0])


async def test_the_read_holds_back_exactly_the_rows_behind_a_dead_row_of_their_key(
    db: tuple[AsyncEngine, str],
) -> None:
    _, conninfo = db
    with psycopg.connect(conninfo, autocommit=True) as conn:
        a1 = add(conn, "a")  # before a's dead row: goes
        add(conn, "a", dead=True)
        add(conn, "a")  # behind it: waits
        add(conn, "a", dead=True)  # a second dead row of a
        add(conn, "a")
        add(conn, None, dead=True)  # a keyless dead row holds nothing back
        none1 = add(conn, None)
        b_retried = add(conn, "b", dead=True)
        conn.execute("UPDATE outbox SET dead_at = NULL WHERE id = %s", (b_retried,))  # retry
        b2 = add(conn, "b")
        c_sent = add(conn, "c")
        conn.execute("UPDATE outbox SET sent_at = now() WHERE id = %s", (c_sent,))
        c2 = add(conn, "c")
        rows, _ = unsent(conn)
    assert [r[0] for r in rows] == [a1, none1, b_retried, b2, c2]


@pytest.mark.parametrize("dead_keys", [1, 2_000])
async def test_the_read_costs_fewer_buffers_than_rows_however_many_keys_are_dead(
    db: tuple[AsyncEngine, str], dead_keys: int
) -> None:
    _, conninfo = db
    # rows of about 1.5 kB: a sequential scan would read more buffers than the bound allows
    live_keys, unsent_rows = 50, 400
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # a relay's history: many rows sent, statistics taken while it kept up ...
        conn.execute(
            "INSERT INTO outbox (topic, key, value, sent_at) SELECT 't', ('k' || (i % 50))::bytea,"
            " repeat(md5(i::text), 47)::bytea, now() FROM generate_series(1, 5000) i"
        )
        conn.execute("ANALYZE outbox")
        # ... then keys die (one row each, and one row waits behind each) ...
        for sql in (
            "INSERT INTO outbox (topic, key, value, dead_at, dead_error)"
            " SELECT 't', ('d' || i)::bytea, '{}', now(), 'too large'"
            " FROM generate_series(1, %s) i",
            "INSERT INTO outbox (topic, key, value)"
            " SELECT 't', ('d' || i)::bytea, '{}' FROM generate_series(1, %s) i",
        ):
            conn.execute(sql, (dead_keys,))
        # ... and the relay falls behind on the live keys
        conn.execute(
            "INSERT INTO outbox (topic, key, value) SELECT 't', ('k' || (i %% %s))::bytea,"
            " repeat(md5(i::text), 47)::bytea FROM generate_series(1, %s) i",
            (live_keys, unsent_rows),
        )
        rows, read = unsent(conn)
    assert len(rows) == unsent_rows
    assert {r[2][:1] for r in rows} == {b"k"}
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    # fewer buffers than unsent rows (they share pages): the n² plan read 3,167 buffers
    # for 400 rows and one dead key
    backlog = unsent_rows + 2 * dead_keys
    assert read < backlog, f"{read} buffers for {backlog} unsent rows, {dead_keys} dead keys"
