"""The relay's read of its unsent rows costs in proportion to the rows, however far it has
fallen behind: PostgreSQL once served "not behind a dead row of its key" by looking each
unsent row up through the index of unsent rows and filtering them all, n² entries a pass,
so a relay that fell behind fell further behind. Counted in buffers (EXPLAIN ANALYZE),
not timed.

Real PostgreSQL (a database of the refunds schema)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.relay import _UNSENT_SQL, RelaySettings
from tests.conftest import Infra
from tests.integration.conftest import refunds_db

pytestmark = pytest.mark.integration

SENT, UNSENT, KEYS = 5_000, 400, 50


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with refunds_db(infra, "relayplan") as found:
        yield found


def buffers(plan: dict) -> int:
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


async def test_the_unsent_read_reads_in_proportion_to_the_rows_behind(
    db: tuple[AsyncEngine, str],
) -> None:
    _, conninfo = db
    limit = RelaySettings().batch
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # a relay's history: many rows sent, statistics taken while it kept up ...
        conn.execute(
            "INSERT INTO outbox (topic, key, value, sent_at)"
            " SELECT 't', ('k' || (i %% %s))::bytea, '{}', now() FROM generate_series(1, %s) i",
            (KEYS, SENT),
        )
        conn.execute("ANALYZE outbox")
        # ... then it falls behind, and one key has a dead row that holds its later rows
        conn.execute(
            "INSERT INTO outbox (topic, key, value)"
            " SELECT 't', ('k' || (i %% %s))::bytea, '{}' FROM generate_series(1, %s) i",
            (KEYS, UNSENT),
        )
        conn.execute(
            "UPDATE outbox SET dead_at = now(), dead_error = 'too large' WHERE id ="
            " (SELECT min(id) FROM outbox WHERE sent_at IS NULL AND key = 'k7'::bytea)"
        )
        explained = conn.execute(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {_UNSENT_SQL.sql}", {"limit": limit}
        ).fetchone()
        rows = conn.execute(_UNSENT_SQL.sql, {"limit": limit}).fetchall()
    assert explained is not None
    plan = (explained[0] if isinstance(explained[0], list) else json.loads(explained[0]))[0]
    # every unsent row but key k7's (the dead one and those behind it), in id order
    behind_dead = UNSENT // KEYS
    assert len(rows) == UNSENT - behind_dead
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert all(r[2] != b"k7" for r in rows)
    # fewer buffers than rows (they share pages): the n² plan read 3,167 here, this one 18
    read = buffers(plan["Plan"])
    assert read < UNSENT, f"{read} buffers for {UNSENT} unsent rows: {plan['Plan']}"
