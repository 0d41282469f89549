"""A connection of a service's engine in autocommit: each statement its own transaction,
without the BEGIN and COMMIT round trips a transaction of one statement costs. For work
done in one statement (a claim, a fenced resolution with its event, the relay's pass)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@contextlib.asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        yield await conn.execution_options(isolation_level="AUTOCOMMIT")
