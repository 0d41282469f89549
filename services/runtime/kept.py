"""Connections of a service's engine kept checked out from one short unit of work to the
next, for the loops that run many of them: the consumer's batches, the relay's passes,
the intent workers' claims and resolutions.

A checkout from SQLAlchemy's pool and its return cost about as much client CPU as the
statement they serve: measured on the bench machine, a one-statement transaction took
445 to 530 µs through ``engine.begin()`` and 330 to 375 µs on a connection kept checked out.
A connection is kept only while its owner runs (``while_running``) and only after its
unit ended cleanly: after any error it is closed — given back to the pool, which rolls
it back, or discards it when it broke — and the next unit checks a fresh one out, as
``engine.begin()`` would. When a connection of the engine breaks (a database restart),
SQLAlchemy renews the pool; a kept connection made before that is given back unused, as
a checkout would find it stale, so a restart fails one unit rather than one per kept
connection. Outside ``while_running`` every unit checks one out and gives it
back, so a caller that never runs the loop (a test driving one pass) leaves nothing out.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


class KeptConnections:
    """``begin()`` like ``engine.begin()`` — or, made with ``autocommit``, ``autocommit()``:
    a connection on which each statement is its own transaction, without the BEGIN and
    COMMIT round trips a transaction of one statement costs — on connections kept between
    units while ``while_running`` is entered. Units may run side by side (a consumer's
    lanes, a worker's rounds): each takes a connection of its own."""

    def __init__(self, engine: AsyncEngine, *, autocommit: bool = False) -> None:
        self.engine, self._autocommit = engine, autocommit
        self._idle: list[AsyncConnection] = []
        self._running = 0

    @contextlib.asynccontextmanager
    async def while_running(self) -> AsyncIterator[None]:
        """Keep connections until this exits; then give every kept one back."""
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            if not self._running:
                idle, self._idle = self._idle, []
                for conn in idle:
                    with contextlib.suppress(Exception):  # a broken one is discarded anyway
                        await conn.close()

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A transaction, committed when the block ends cleanly, else rolled back."""
        assert not self._autocommit, "a keeper of autocommit connections"
        async with self._unit() as conn, conn.begin():
            yield conn

    @contextlib.asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection in autocommit: each statement its own transaction."""
        assert self._autocommit, "a keeper of connections for transactions"
        async with self._unit() as conn:
            yield conn
            if conn.in_transaction():  # SQLAlchemy began one (no BEGIN was sent)
                await conn.commit()

    @contextlib.asynccontextmanager
    async def _unit(self) -> AsyncIterator[AsyncConnection]:
        conn = await self._take()
        clean = False
        try:
            yield conn
            clean = not conn.invalidated and not conn.in_transaction()
        finally:
            if clean and self._running:
                self._idle.append(conn)
            else:
                await conn.close()

    async def _take(self) -> AsyncConnection:
        """A kept connection, unless the pool was renewed since it was made — a connection
        of the engine broke (a database restart): the others are given back then, as a
        checkout would find them stale, so that the restart fails one unit, not one per
        connection kept — else one checked out."""
        while self._idle:
            conn = self._idle.pop()
            if not _renewed_since(conn):
                return conn
            await conn.close()
        return await self._checkout()

    async def _checkout(self) -> AsyncConnection:
        conn = await self.engine.connect()
        if self._autocommit:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        return conn


def _renewed_since(conn: AsyncConnection) -> bool:
    """The engine's pool was renewed (``Pool._invalidate``, as SQLAlchemy and
    ``driver.execute`` do on a disconnect) after ``conn``'s connection was made: what the
    pool's own checkout compares (``_ConnectionRecord.get_connection``)."""
    sync = conn.sync_connection
    record = None if sync is None else sync.connection._connection_record
    if sync is None or record is None:
        return True
    return bool(sync.engine.pool._invalidate_time > record.starttime)
