"""Writes collected until a transaction's end: the one place that turns a batch's
inserts (outbox rows, audit rows) and wake-ups (NOTIFY) into one statement.

A transaction that applies a batch of records ``defer``s: from then on ``insert`` and
``wake`` collect instead of making a round trip each, and ``folded`` writes everything
collected in the statement that ends the batch (its stored positions) — data-modifying
CTEs, one multi-row insert per table, in the order the rows were written. Whatever is
still collected when a savepoint begins or the transaction commits is written then
(``_write_collected``): a collected row is never lost, never lands inside a savepoint
that is rolled back, and never commits out of order. Inside a savepoint, and in a
transaction that does not defer, ``insert`` and ``wake`` write at once.

An ``upsert`` is collected once per row key, the last written winning (its
``insert_only`` columns kept from the first). What a deferring transaction knows of the
rows it locked and read can live beside what it collected (``scoped``), so that reads
its own collected writes would make stale are never sent.

A wake-up is said once per transaction and channel (one said in a savepoint that is
rolled back is undone with it: said again).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BindParameter,
    Column,
    ColumnElement,
    Connection,
    Executable,
    Insert,
    Select,
    String,
    Table,
    Text,
    bindparam,
    cast,
    event,
    func,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection

#: ``conn.info`` keys: what a deferring transaction collected; the channels said
_COLLECTED = "paysaga_deferred"
_SAID = "paysaga_deferred_said"

#: rows of one multi-row insert: the table, the columns whose conflict skips a row
#: (None: none is skipped), the row's columns
_Group = tuple[Table, tuple[str, ...] | None, tuple[str, ...]]
#: rows of one multi-row upsert: the table, its key columns, the columns a conflict
#: leaves as they are, the row's columns
_Upserts = tuple[Table, tuple[str, ...], tuple[str, ...], tuple[str, ...]]

T = TypeVar("T")


@dataclasses.dataclass
class _Collected:
    transaction: Any
    rows: dict[_Group, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    #: by row key, the last written (dicts keep the order keys were first written in)
    upserts: dict[_Upserts, dict[tuple[Any, ...], dict[str, Any]]] = dataclasses.field(
        default_factory=dict
    )
    channels: dict[str, None] = dataclasses.field(default_factory=dict)
    #: ``scoped``: by kind
    known: dict[type[Any], Any] = dataclasses.field(default_factory=dict)

    def take(self) -> tuple[list[Insert], list[str]]:
        writes = [_insert(table, unique, rows) for (table, unique, _), rows in self.rows.items()]
        writes += [
            _upsert(table, key, insert_only, list(rows.values()))
            for (table, key, insert_only, _), rows in self.upserts.items()
        ]
        channels = list(self.channels)
        self.rows, self.upserts, self.channels = {}, {}, {}
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
    sync = _sync(conn)
    collected = _collected(sync)
    if collected is None:
        stmt = _statement(sync, [_insert(table, unique, [row])], [wake] if wake else [])
        assert stmt is not None
        await conn.execute(stmt)
        return
    group = (table, tuple(unique) if unique else None, tuple(row))
    collected.rows.setdefault(group, []).append(row)
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
    sync = _sync(conn)
    collected = _collected(sync)
    if collected is None:
        await conn.execute(_upsert(table, tuple(key), tuple(insert_only), [row]))
        return
    group = (table, tuple(key), tuple(insert_only), tuple(row))
    rows = collected.upserts.setdefault(group, {})
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
    stmt = _statement(sync, [], [channel])
    if stmt is not None:
        await conn.execute(stmt)


async def write_now(conn: AsyncConnection) -> None:
    """Write what ``conn``'s transaction collected so far, now: before a step whose
    failure must be its own (a savepoint begun would write it inside its ``try``)."""
    stmt = _collected_statement(_sync(conn))
    if stmt is not None:
        await conn.execute(stmt)


def folded(conn: AsyncConnection, stmt: Insert) -> Executable:
    """``stmt`` (the write that ends a batch: its stored positions), with what the
    transaction collected written in the same statement."""
    sync = _sync(conn)
    collected = _collected(sync)
    if collected is None:
        return stmt
    writes, channels = collected.take()
    folded_stmt = _statement(sync, [*writes, stmt], channels)
    assert folded_stmt is not None
    return folded_stmt


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
    in their order: one statement SQLAlchemy caches and PostgreSQL prepares, whatever
    their number (a multi-row ``VALUES`` is compiled anew on every call)."""
    columns = list(rows[0])
    arrays = [_array(table.c[c], [r[c] for r in rows]) for c in columns]
    source = func.unnest(*arrays).table_valued(*columns, with_ordinality="ord").render_derived()
    return select(*(_typed(table.c[c], source.c[c]) for c in columns)).order_by(source.c.ord)


def _array(column: Column[Any], values: list[Any]) -> BindParameter[Any]:
    """A column's values as one array parameter. JSON documents go as text (a document
    that is itself a list would make the array multi-dimensional), cast back in
    ``_typed``; strings as text, whatever the column's length: the insert's assignment
    refuses a value too long, where a cast to ``varchar(n)[]`` would cut it short."""
    if isinstance(column.type, JSON):
        # None as the column type stores it: SQL NULL or the JSON null
        texts = [None if v is None and column.type.none_as_null else json.dumps(v) for v in values]
        return bindparam(column.name, texts, type_=ARRAY(Text), unique=True)
    if isinstance(column.type, String):
        return bindparam(column.name, values, type_=ARRAY(Text), unique=True)
    return bindparam(column.name, values, type_=ARRAY(column.type), unique=True)


def _typed(column: Column[Any], value: ColumnElement[Any]) -> ColumnElement[Any]:
    return cast(value, column.type) if isinstance(column.type, JSON) else value


def _insert(table: Table, unique: Sequence[str] | None, rows: list[dict[str, Any]]) -> Insert:
    stmt = pg_insert(table).from_select(list(rows[0]), unnested(table, rows))
    return stmt.on_conflict_do_nothing(index_elements=list(unique)) if unique else stmt


def _upsert(
    table: Table, key: tuple[str, ...], insert_only: tuple[str, ...], rows: list[dict[str, Any]]
) -> Insert:
    stmt = pg_insert(table).from_select(list(rows[0]), unnested(table, rows))
    kept = {*key, *insert_only}
    return stmt.on_conflict_do_update(
        index_elements=list(key),
        set_={c: stmt.excluded[c] for c in rows[0] if c not in kept},
    )


def _statement(sync: Connection, writes: list[Insert], channels: list[str]) -> Executable | None:
    """``writes`` as one statement (data-modifying CTEs), saying the ``channels`` not
    said yet in this transaction; None if there is nothing to do."""
    transaction = sync.get_transaction()
    said: tuple[Any, set[str]] | None = sync.info.get(_SAID)
    if said is None or said[0] is not transaction:
        said = (transaction, set())
        sync.info[_SAID] = said
    new = [c for c in channels if c not in said[1]]
    if not sync.in_nested_transaction():
        said[1].update(new)
    ctes = [w.cte(f"write_{i}") for i, w in enumerate(writes)]
    if new:
        return select(*(func.pg_notify(c, "") for c in new)).add_cte(*ctes)
    if not writes:
        return None
    main, *rest = writes
    return main.add_cte(*ctes[1:]) if rest else main


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
        sync.execute(stmt)
    collected.known.clear()


def _collected_statement(sync: Connection) -> Executable | None:
    """What ``sync``'s transaction collected so far, taken, as one statement; None if
    nothing is."""
    collected = _collected(sync)
    return _statement(sync, *collected.take()) if collected is not None else None
