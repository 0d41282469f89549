"""Writes collected until a transaction's end: the one place that turns a batch's
inserts (outbox rows, audit rows, the orders projection's rows) and wake-ups (NOTIFY)
into one statement.

A transaction that applies a batch of records ``defer``s: from then on ``insert``,
``upsert`` and ``wake`` collect instead of making a round trip each, and ``folded``
writes everything collected in the statement that ends the batch (its stored
positions) — data-modifying CTEs, one multi-row insert per table, in the order the rows
were written. Whatever is still collected when a savepoint begins or the transaction
commits is written then (``_write_collected``): a collected row is never lost, never
lands inside a savepoint that is rolled back, and never commits out of order. Inside a
savepoint, and in a transaction that does not defer, they write at once.

An ``upsert`` is collected once per row key, the last written winning (its
``insert_only`` columns kept from the first). What a deferring transaction knows of the
rows it locked and read can live beside what it collected (``scoped``), so that reads
its own collected writes would make stale are never sent.

A wake-up is said once per transaction and channel (one said in a savepoint that is
rolled back is undone with it: said again).

Each statement is built and compiled once per shape — its writes' tables, columns and
conflicts, and its number of channels (``Rows``, ``_sql``) — and sent as driver SQL
with one array parameter per column: building a statement, and its cache key, on every
call cost more than the round trip it replaced.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import (
    JSON,
    BindParameter,
    Column,
    ColumnElement,
    Connection,
    Select,
    String,
    Table,
    Text,
    bindparam,
    cast,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, Insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime import driver

#: ``conn.info`` keys: what a deferring transaction collected; the channels said
_COLLECTED = "paysaga_deferred"
_SAID = "paysaga_deferred_said"

T = TypeVar("T")


class Conflict(Protocol):
    """What a row that conflicts does: applied to the insert of a ``Rows``; hashable
    (a statement is compiled once per shape)."""

    def __call__(self, stmt: Insert, columns: tuple[str, ...]) -> Insert: ...


@dataclasses.dataclass(frozen=True)
class Skip:
    """A row that conflicts on ``unique`` is skipped."""

    unique: tuple[str, ...]

    def __call__(self, stmt: Insert, columns: tuple[str, ...]) -> Insert:
        return stmt.on_conflict_do_nothing(index_elements=list(self.unique))


@dataclasses.dataclass(frozen=True)
class Replace:
    """A row whose ``key`` exists updates the other columns but ``insert_only``."""

    key: tuple[str, ...]
    insert_only: tuple[str, ...] = ()

    def __call__(self, stmt: Insert, columns: tuple[str, ...]) -> Insert:
        kept = {*self.key, *self.insert_only}
        return stmt.on_conflict_do_update(
            index_elements=list(self.key),
            set_={c: stmt.excluded[c] for c in columns if c not in kept},
        )


@dataclasses.dataclass(frozen=True)
class Rows:
    """The shape of a multi-row insert: its table, its rows' columns and what a row
    that conflicts does (None: the insert fails)."""

    table: Table
    columns: tuple[str, ...]
    conflict: Conflict | None = None

    def insert(self, prefix: str) -> Insert:
        """The insert, its columns bound as arrays named ``prefix + column``."""
        stmt = pg_insert(self.table).from_select(
            list(self.columns), _unnested(self.table, self.columns, prefix)
        )
        return self.conflict(stmt, self.columns) if self.conflict is not None else stmt

    def params(self, prefix: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {prefix + c: _values(self.table.c[c], [r[c] for r in rows]) for c in self.columns}


@dataclasses.dataclass
class _Collected:
    transaction: Any
    #: by shape, the rows in the order written — by key for a ``Replace``, the last
    #: written (a dict keeps the order keys were first written in)
    rows: dict[Rows, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    replaced: dict[Rows, dict[tuple[Any, ...], dict[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    channels: dict[str, None] = dataclasses.field(default_factory=dict)
    #: ``scoped``: by kind
    known: dict[type[Any], Any] = dataclasses.field(default_factory=dict)

    def take(self) -> tuple[list[tuple[Rows, Sequence[dict[str, Any]]]], list[str]]:
        writes: list[tuple[Rows, Sequence[dict[str, Any]]]] = list(self.rows.items())
        writes += [(shape, list(rows.values())) for shape, rows in self.replaced.items()]
        channels = list(self.channels)
        self.rows, self.replaced, self.channels = {}, {}, {}
        return writes, channels


def defer(conn: AsyncConnection) -> None:
    """Collect ``conn``'s transaction's inserts and wake-ups from now on."""
    conn.info[_COLLECTED] = _Collected(_sync(conn).get_transaction())


async def insert(
    conn: AsyncConnection,
    table: Table,
    row: dict[str, Any],
    *,
    unique: Sequence[str] | None = None,
    wake: str | None = None,
) -> None:
    """Insert ``row`` into ``table`` in ``conn``'s transaction — skipped if it conflicts
    on ``unique`` — and wake ``wake``'s listeners at commit: collected if the
    transaction defers, else at once."""
    shape = Rows(table, tuple(row), Skip(tuple(unique)) if unique else None)
    sync = _sync(conn)
    collected = _collected(sync)
    if collected is None:
        await _execute(conn, sync, [(shape, [row])], [wake] if wake else [])
        return
    collected.rows.setdefault(shape, []).append(row)
    if wake:
        collected.channels[wake] = None


async def upsert(
    conn: AsyncConnection,
    table: Table,
    row: dict[str, Any],
    *,
    key: Sequence[str],
    insert_only: Sequence[str] = (),
) -> None:
    """Insert ``row`` into ``table`` or, where its ``key`` exists, update the row's other
    columns but ``insert_only``: collected if the transaction defers — a later upsert of
    the same key replacing it, its ``insert_only`` values kept — else at once."""
    shape = Rows(table, tuple(row), Replace(tuple(key), tuple(insert_only)))
    sync = _sync(conn)
    collected = _collected(sync)
    if collected is None:
        await _execute(conn, sync, [(shape, [row])], [])
        return
    rows = collected.replaced.setdefault(shape, {})
    at = tuple(row[c] for c in key)
    first = rows.get(at)
    rows[at] = row if first is None else row | {c: first[c] for c in insert_only}


def scoped(conn: AsyncConnection, kind: type[T]) -> T | None:
    """The ``kind()`` that lives as long as ``conn``'s deferring transaction — for what
    it knows of rows it locked and read, kept true by writing through it — or None where
    writes go at once (a transaction that does not defer, a savepoint). Forgotten when a
    savepoint begins (a rollback to it would undo what it was told), after what was
    collected is written: the database then answers."""
    collected = _collected(_sync(conn))
    if collected is None:
        return None
    known = collected.known.get(kind)
    if known is None:
        known = collected.known[kind] = kind()
    assert isinstance(known, kind)
    return known


async def wake(conn: AsyncConnection, channel: str) -> None:
    """Wake the workers listening on ``channel`` once ``conn``'s transaction commits."""
    sync = _sync(conn)
    collected = _collected(sync)
    if collected is not None:
        collected.channels[channel] = None
        return
    await _execute(conn, sync, [], [channel])


async def write_now(conn: AsyncConnection) -> None:
    """Write what ``conn``'s transaction collected so far, now: before a step whose
    failure must be its own (a savepoint begun would write it inside its ``try``)."""
    sync = _sync(conn)
    collected = _collected(sync)
    if collected is not None:
        await _execute(conn, sync, *collected.take())


async def folded(conn: AsyncConnection, shape: Rows, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (the write that ends a batch: its stored positions) and — in the
    same statement — what the transaction collected."""
    sync = _sync(conn)
    collected = _collected(sync)
    writes, channels = collected.take() if collected is not None else ([], [])
    await _execute(conn, sync, [*writes, (shape, rows)], channels)


def _sync(conn: AsyncConnection) -> Connection:
    sync = conn.sync_connection
    assert sync is not None, "the connection is started"
    return sync


def _collected(sync: Connection) -> _Collected | None:
    """What ``sync``'s transaction collects; None if it does not defer, or inside a
    savepoint (written at once there)."""
    collected = sync.info.get(_COLLECTED)
    transaction = sync.get_transaction()  # the root one, inside a savepoint too
    if (
        collected is None
        or transaction is None
        or collected.transaction is not transaction
        or sync.in_nested_transaction()
    ):
        return None
    assert isinstance(collected, _Collected)
    return collected


def unnested(table: Table, rows: Sequence[dict[str, Any]]) -> Select[Any]:
    """``rows`` (of ``table``, all with the same columns) as a select of unnested arrays,
    in their order, its values bound: one statement SQLAlchemy caches and PostgreSQL
    prepares, whatever their number (a multi-row ``VALUES`` is compiled anew on every
    call). For a statement of its own; the writes here bind theirs at execution."""
    columns = tuple(rows[0])
    params = Rows(table, columns).params("", rows)
    return _unnested(table, columns, "").params(params)


def _unnested(table: Table, columns: tuple[str, ...], prefix: str) -> Select[Any]:
    arrays = [_array(table.c[c], prefix + c) for c in columns]
    source = func.unnest(*arrays).table_valued(*columns, with_ordinality="ord").render_derived()
    return select(*(_typed(table.c[c], source.c[c]) for c in columns)).order_by(source.c.ord)


def _array(column: Column[Any], name: str) -> BindParameter[Any]:
    """A column's values as one array parameter. JSON documents go as text (a document
    that is itself a list would make the array multi-dimensional), cast back in
    ``_typed``; strings as text, whatever the column's length: the insert's assignment
    refuses a value too long, where a cast to ``varchar(n)[]`` would cut it short."""
    if isinstance(column.type, JSON | String):
        return bindparam(name, type_=ARRAY(Text))
    return bindparam(name, type_=ARRAY(column.type))


def _values(column: Column[Any], values: list[Any]) -> list[Any]:
    if isinstance(column.type, JSON):
        # None as the column type stores it: SQL NULL or the JSON null
        return [None if v is None and column.type.none_as_null else json.dumps(v) for v in values]
    return values


def _typed(column: Column[Any], value: ColumnElement[Any]) -> ColumnElement[Any]:
    return cast(value, column.type) if isinstance(column.type, JSON) else value


@functools.lru_cache(maxsize=512)
def _sql(dialect: Dialect, shapes: tuple[Rows, ...], channels: int) -> str:
    """The statement of writes of ``shapes`` (data-modifying CTEs) that says
    ``channels`` channels, compiled: the ``i``-th write's columns bound as ``w{i}_…``,
    the channels as ``n0``, ``n1``…"""
    writes = [shape.insert(f"w{i}_") for i, shape in enumerate(shapes)]
    ctes = [w.cte(f"write_{i}") for i, w in enumerate(writes)]
    if channels:
        notify = (
            func.pg_notify(bindparam(f"n{j}", type_=Text), literal_column("''"))
            for j in range(channels)
        )
        stmt: Any = select(*notify).add_cte(*ctes)
    else:
        main, *rest = writes
        stmt = main.add_cte(*ctes[1:]) if rest else main
    compiled = stmt.compile(dialect=dialect)
    # every parameter is one the caller binds: none took a value when it was built
    bound = {f"n{j}" for j in range(channels)}
    bound |= {f"w{i}_{c}" for i, shape in enumerate(shapes) for c in shape.columns}
    assert set(compiled.params) == bound, compiled.params
    return str(compiled)


def _statement(
    sync: Connection, writes: list[tuple[Rows, Sequence[dict[str, Any]]]], channels: list[str]
) -> tuple[str, dict[str, Any]] | None:
    """``writes`` as one statement and its parameters, saying the ``channels`` not said
    yet in this transaction; None if there is nothing to do."""
    transaction = sync.get_transaction()
    said: tuple[Any, set[str]] | None = sync.info.get(_SAID)
    if said is None or said[0] is not transaction:
        said = (transaction, set())
        sync.info[_SAID] = said
    new = [c for c in channels if c not in said[1]]
    if not sync.in_nested_transaction():
        said[1].update(new)
    if not writes and not new:
        return None
    params: dict[str, Any] = {f"n{j}": c for j, c in enumerate(new)}
    for i, (shape, rows) in enumerate(writes):
        params |= shape.params(f"w{i}_", rows)
    return _sql(sync.dialect, tuple(shape for shape, _ in writes), len(new)), params


async def _execute(
    conn: AsyncConnection,
    sync: Connection,
    writes: list[tuple[Rows, Sequence[dict[str, Any]]]],
    channels: list[str],
) -> None:
    stmt = _statement(sync, writes, channels)
    if stmt is not None:
        await driver.execute(conn, *stmt)


@event.listens_for(Engine, "savepoint")
@event.listens_for(Engine, "commit")
def _write_collected(sync: Connection, *_: Any) -> None:
    """What is still collected when a savepoint begins (before it: a rollback to it must
    not undo it) or when the transaction commits is written then; what the transaction
    knew (``scoped``) is forgotten."""
    collected = _collected(sync)
    if collected is None:
        return
    stmt = _statement(sync, *collected.take())
    if stmt is not None:
        sync.exec_driver_sql(*stmt)
    collected.known.clear()
