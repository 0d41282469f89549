"""Transaction-scoped named locks: ``pg_advisory_xact_lock`` on a hash of a name, held
until the transaction ends (re-entrant within it). Names carry their own namespace
(``orders:{id}``, ``payments:intent:{id}``, ``{group}|{key}``)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Text, bindparam, func, literal_column, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime import driver

#: a name's lock key (the one hash, whichever statement takes the lock)
_KEY = "hashtextextended({}, 0)"

#: the lock as an SQL expression, for a statement that takes it among other work: the
#: name is bound as ``:lock_name``
XACT_LOCK_SQL = f"pg_advisory_xact_lock({_KEY.format(':lock_name')})"


#: the lock as a Core expression (the key of ``_KEY``), for a statement that takes it
#: after its other work: the name is bound as ``:lock_name``, as in ``XACT_LOCK_SQL``
XACT_LOCK_EXPRESSION = func.pg_advisory_xact_lock(
    func.hashtextextended(bindparam("lock_name", type_=Text), literal_column("0"))
)


#: several locks in one statement, in the order of the array
_XACT_LOCKS = text(
    f"SELECT pg_advisory_xact_lock({_KEY.format('n')})"  # noqa: S608 (constants; names bound)
    " FROM unnest(CAST(:names AS text[])) WITH ORDINALITY AS l(n, ord) ORDER BY ord"
)
_XACT_LOCKS_SQL = driver.sql_of(_XACT_LOCKS)


async def xact_lock(conn: AsyncConnection, name: str) -> None:
    """Wait for, then hold until commit or rollback, the lock called ``name``."""
    await conn.execute(text(f"SELECT {XACT_LOCK_SQL}"), {"lock_name": name})


async def xact_locks(conn: AsyncConnection, names: Iterable[str]) -> None:
    """Wait for, then hold, the locks called ``names`` — in one statement, taken in
    code point order: two transactions locking overlapping names wait in one order."""
    await driver.execute(conn, _XACT_LOCKS_SQL, {"names": sorted(set(names))})
