"""Transaction-scoped named locks: ``pg_advisory_xact_lock`` on a hash of a name, held
until the transaction ends (re-entrant within it). Names carry their own namespace
(``orders:{id}``, ``payments:intent:{id}``, ``{group}|{key}``)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

#: the lock as an SQL expression, for a statement that takes it among other work: the
#: name is bound as ``:lock_name``
XACT_LOCK_SQL = "pg_advisory_xact_lock(hashtextextended(:lock_name, 0))"


async def xact_lock(conn: AsyncConnection, name: str) -> None:
    """Wait for, then hold until commit or rollback, the lock called ``name``."""
    await conn.execute(text(f"SELECT {XACT_LOCK_SQL}"), {"lock_name": name})
