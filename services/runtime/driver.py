"""The hot statements sent on the driver's connection itself: ``execute`` runs a
statement compiled once (``sql_of``) on the psycopg connection under a SQLAlchemy
``AsyncConnection``, in its transaction, without SQLAlchemy's execution layer (the
greenlet hop, its cursor wrapper and result object). Measured on the bench machine, one
statement cost its client about 175 µs of CPU through SQLAlchemy and 95 µs this way.

Only for statements whose values need no SQLAlchemy type processing (text, numbers,
bytes, timestamps, arrays of them; JSON read as psycopg loads it). A failure is raised
as SQLAlchemy raises it (``sqlalchemy.exc.DBAPIError`` and its subclasses, with
``connection_invalidated`` set, and the pool renewed when the connection broke), so the
errors' one place (``errors.is_transient``) and every caller's handling see what they
saw before; the engine's ``before_cursor_execute`` and ``after_cursor_execute``
listeners hear them (their return values are not used).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import psycopg
import sqlalchemy.exc
from psycopg.rows import namedtuple_row
from sqlalchemy import ARRAY
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.util import greenlet_spawn

_DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]


def sql_of(stmt: ClauseElement) -> str:
    """``stmt`` compiled for psycopg once, its values bound by name (``%(name)s``); call
    it where the statement is built, not per execution."""
    compiled = cast(SQLCompiler, stmt.compile(dialect=_DIALECT))
    for name, b in compiled.binds.items():
        # every value is the caller's, and goes to psycopg as it is given
        assert b.value is None, f"{name}: a value built in"
        assert b.callable is None, f"{name}: a value built in"
        assert not b.expanding, f"{name}: an expanding IN list"
        assert not _converted(b.type), f"{name}: a value SQLAlchemy converts"
    return str(compiled)


def _converted(type_: TypeEngine[Any]) -> bool:
    """Whether SQLAlchemy changes a value of ``type_`` before psycopg sees it (an
    array's processor only turns a tuple into a list: its items count)."""
    if isinstance(type_, ARRAY):
        return _converted(type_.item_type)
    return type_.bind_processor(_DIALECT) is not None


async def execute(
    conn: AsyncConnection, sql: str, params: Mapping[str, Any]
) -> psycopg.AsyncCursor[Any]:
    """Run ``sql`` with ``params`` on ``conn``'s driver connection, in the transaction
    SQLAlchemy began on it (``engine.begin()``, a savepoint) or in autocommit — never as
    the start of one: SQLAlchemy would not know of it, and would neither commit it nor
    fire its commit events. The cursor's rows are named tuples."""
    sync = conn.sync_connection
    assert sync is not None, "a connection that was started"
    fairy = sync.connection
    raw = cast("psycopg.AsyncConnection[Any]", fairy.driver_connection)
    assert sync.in_transaction() or raw.autocommit, "in a transaction SQLAlchemy began"
    cur = raw.cursor(row_factory=namedtuple_row)
    # what listens to the engine's statements (counts, instrumentation) hears these too
    heard = bool(sync.dispatch.before_cursor_execute or sync.dispatch.after_cursor_execute)
    if heard:
        sync.dispatch.before_cursor_execute(sync, cur, sql, params, None, False)
    try:
        await cur.execute(sql, params)
    except psycopg.Error as exc:
        broken = raw.broken
        if broken:  # as SQLAlchemy does on a disconnect: the whole pool is renewed
            await greenlet_spawn(sync.engine.pool._invalidate, fairy, exc)
            await conn.invalidate(exc)
        raise sqlalchemy.exc.DBAPIError.instance(
            sql, params, exc, psycopg.Error, hide_parameters=True, connection_invalidated=broken
        ) from exc
    if heard:
        sync.dispatch.after_cursor_execute(sync, cur, sql, params, None, False)
    return cur


async def rows(conn: AsyncConnection, sql: str, params: Mapping[str, Any]) -> list[Any]:
    """``execute``, and the rows it returned."""
    return await (await execute(conn, sql, params)).fetchall()
