"""The statements sent on the driver's connection (``services.runtime.driver``) behave
as SQLAlchemy's do, on a real PostgreSQL: in the transaction SQLAlchemy began (undone by
its rollback, committed by its commit), failures raised as SQLAlchemy raises them
(without their values), a broken connection renewing the pool, and the engine's
statement listeners hearing them."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    bindparam,
    event,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import driver
from services.runtime.bound import bound
from services.runtime.errors import is_transient
from services.runtime.kept import KeptConnections
from services.runtime.tables import outbox
from tests.conftest import Infra
from tests.integration.conftest import INBOX_INSERT as _INSERT
from tests.integration.conftest import inbox_keys as _keys
from tests.integration.conftest import refunds_db

pytestmark = pytest.mark.asyncio


async def _insert(engine: AsyncEngine, key: str) -> None:
    async with engine.begin() as conn:
        await driver.execute(conn, _INSERT, {"group": "g", "key": key})


async def test_a_driver_statement_lives_and_dies_with_the_transaction(infra: Infra) -> None:
    async with refunds_db(infra, "drv_tx") as (engine, _):

        async def failing_handler() -> None:
            async with engine.begin() as conn:
                await driver.execute(conn, _INSERT, {"group": "g", "key": "undone"})
                raise RuntimeError("the handler failed")

        with pytest.raises(RuntimeError):
            await failing_handler()
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))  # SQLAlchemy's statement, then the driver's
            cur = await driver.execute(conn, _INSERT, {"group": "g", "key": "kept"})
            assert (await cur.fetchone()) == (1,)
            async with conn.begin_nested() as nested:
                await driver.execute(conn, _INSERT, {"group": "g", "key": "savepoint"})
                await nested.rollback()
        async with KeptConnections(engine, autocommit=True).autocommit() as conn:
            await driver.execute(conn, _INSERT, {"group": "g", "key": "autocommit"})
        assert await _keys(engine) == ["autocommit", "kept"]


async def test_a_failure_is_sqlalchemys_error_without_its_values(infra: Infra) -> None:
    async with refunds_db(infra, "drv_err") as (engine, _):
        await _insert(engine, "secret-value-1")
        with pytest.raises(sqlalchemy.exc.IntegrityError) as raised:
            await _insert(engine, "secret-value-1")
        assert isinstance(raised.value.orig, psycopg.errors.UniqueViolation)
        assert not is_transient(raised.value)  # a constraint: retrying cannot help
        assert "[parameters:" not in str(raised.value)  # hidden: a value may be a secret
        assert await _keys(engine) == ["secret-value-1"]


async def test_a_broken_connection_is_transient_and_renews_the_pool(infra: Infra) -> None:
    async with refunds_db(infra, "drv_broken") as (engine, conninfo):
        async with engine.connect() as a, engine.connect() as b:
            pids = [
                (await a.execute(text("SELECT pg_backend_pid()"))).scalar_one(),
                (await b.execute(text("SELECT pg_backend_pid()"))).scalar_one(),
            ]
            await a.rollback()
            await b.rollback()
        # both back in the pool; the server ends them (a restart, a failover)
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as killer:
            await killer.execute("SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) p", [pids])
        with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
            await _insert(engine, "k")
        failed = raised.value
        assert failed.connection_invalidated
        assert is_transient(failed)
        # the pool was renewed: the next transactions get live connections
        async with engine.begin() as c1, engine.begin() as c2:
            await driver.execute(c1, _INSERT, {"group": "g", "key": "after-1"})
            await driver.execute(c2, _INSERT, {"group": "g", "key": "after-2"})
        assert "after-1" in await _keys(engine)


async def test_the_engines_listeners_hear_driver_statements(infra: Infra) -> None:
    async with refunds_db(infra, "drv_heard") as (engine, _):
        heard: list[tuple[str, str]] = []

        def before(_c: object, _cur: object, sql: str, *_: object) -> None:
            heard.append(("before", sql))

        def after(_c: object, _cur: object, sql: str, *_: object) -> None:
            heard.append(("after", sql))

        event.listen(engine.sync_engine, "before_cursor_execute", before)
        event.listen(engine.sync_engine, "after_cursor_execute", after)
        async with engine.begin() as conn:
            await driver.execute(conn, _INSERT, {"group": "g", "key": "k"})
        assert heard == [("before", _INSERT.sql), ("after", _INSERT.sql)]


async def test_a_value_sqlalchemy_converts_goes_as_sqlalchemy_sends_it(infra: Infra) -> None:
    """A JSON document is wrapped as SQLAlchemy wraps it: stored as the same document
    (a JSON array, not a PostgreSQL array nor a string), read back as SQLAlchemy reads it."""
    stmt = (
        insert(outbox)
        .values(bound(outbox, ("topic", "key", "value", "headers"), "e_"))
        .returning(outbox.c.id, outbox.c.headers)
    )
    sent = driver.sql_of(stmt)
    assert [name for name, _ in sent.converted] == ["e_headers"]
    headers = [["traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]]
    params = {"e_topic": "t", "e_key": b"k", "e_value": b"v", "e_headers": headers}
    async with refunds_db(infra, "drv_json") as (engine, _):
        async with engine.begin() as conn:
            [ours] = await driver.rows(conn, sent, params)
            theirs = (await conn.execute(stmt, params)).one()
            stored = (
                await conn.execute(
                    select(
                        outbox.c.id, literal_column("jsonb_typeof(headers)").label("kind")
                    ).order_by(outbox.c.id)
                )
            ).all()
        assert ours.headers == theirs.headers == headers
        assert [(r.id, r.kind) for r in stored] == [(ours.id, "array"), (theirs.id, "array")]


async def test_a_statement_sqlalchemy_would_complete_at_execution_is_refused() -> None:
    with pytest.raises(AssertionError, match="a value built in"):
        driver.sql_of(select(outbox.c.id).where(outbox.c.topic == "built in"))
    rendered = bindparam("id", type_=Integer, literal_execute=True)
    with pytest.raises(AssertionError, match="rendered at execution"):
        driver.sql_of(select(outbox.c.id).where(outbox.c.id == rendered))
    defaulted = Table(
        "defaulted",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("at", Integer, default=lambda: 1),  # a value Python computes per row
    )
    with pytest.raises(AssertionError, match="Python-side defaults"):
        driver.sql_of(insert(defaulted).values(id=bindparam("id", type_=Integer)))
