"""Writing to the outbox: the only way any paysaga code emits an event.

Rows are written in the caller's transaction and published by the relay after commit,
so an event exists exactly when the state change that caused it does. An event is a
model of ``schemas.events`` / ``schemas.contract`` (its class name is its event type);
``write_event`` builds its validated envelope (``schemas.envelope.new_envelope``) from
the ``Cause`` — causation id, ``saga_seq``, correlation id, traceparent — and writes
the row. ``write_raw`` is for records that are not events of ours (a dead letter's
replay keeps the bytes it had).

A transaction that applies a batch of records ``defer``s its rows: they are collected
and written together, in the order they were written, in one statement with the
batch's stored positions (``folded``) — not one round trip per row. Whatever is still
collected when a savepoint begins or the transaction commits is written then
(``_write_collected``), so a collected row is never lost, never lands inside a
savepoint that is rolled back, and never commits out of order.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, Executable, Insert, event, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.envelope import dump, event_type_of, new_envelope
from services.runtime import tracing
from services.runtime.tables import outbox

#: NOTIFY channel the outbox relay of a database listens on
OUTBOX_CHANNEL = "paysaga_outbox"
#: ``conn.info`` key: outbox rows written on the connection so far (step latency)
OUTBOX_ROWS = "paysaga_outbox_rows"
#: ``conn.info`` keys: (transaction, rows collected in it) of a deferring transaction;
#: the transaction whose NOTIFY is said
_COLLECTED = "paysaga_outbox_collected"
_NOTIFIED = "paysaga_outbox_notified"


@dataclasses.dataclass(frozen=True, slots=True)
class Cause:
    """What an emitted event is the effect of: the cause's event id (its
    ``causation_id``), the cause's ``saga_seq`` (None: the event starts a saga), the
    saga's correlation id, and the traceparent of the span the effect is written in
    (None: the span open in this task, ``tracing.current()``; a new trace outside any)."""

    event_id: str
    saga_seq: int | None = None
    correlation_id: str | None = None
    traceparent: str | None = None

    @property
    def next_seq(self) -> int:
        """The effect's ``saga_seq``: the cause's + 1, 1 for a saga root."""
        return self.saga_seq + 1 if self.saga_seq else 1

    def as_root(self) -> Cause:
        """The same cause for an event that starts a saga of its own (``saga_seq`` 1)."""
        return dataclasses.replace(self, saga_seq=None)


async def write_raw(
    conn: AsyncConnection,
    topic: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    row = {"topic": topic, "key": key, "value": value, "headers": [list(h) for h in headers]}
    conn.info[OUTBOX_ROWS] = conn.info.get(OUTBOX_ROWS, 0) + 1
    collected = _collected(_sync(conn))
    if collected is not None and not conn.in_nested_transaction():
        collected.append(row)
        return
    # inside a savepoint a row is written at once: a rollback to it undoes the row
    await conn.execute(_statement(_sync(conn), [insert(outbox).values(row)]))


def defer(conn: AsyncConnection) -> None:
    """Collect the outbox rows of ``conn``'s transaction from now on, to be written in
    one statement (``folded``, else at the next savepoint or at commit)."""
    conn.info[_COLLECTED] = (_sync(conn).get_transaction(), [])


def folded(conn: AsyncConnection, stmt: Insert) -> Executable:
    """``stmt`` (a write of the transaction's end: its stored positions), with the
    outbox rows collected so far written in the same statement, and the relay's NOTIFY."""
    rows = _take(_sync(conn))
    if not rows:
        return stmt
    return _statement(_sync(conn), [insert(outbox).values(rows), stmt])


def _sync(conn: AsyncConnection) -> Connection:
    sync = conn.sync_connection
    assert sync is not None, "the connection is started"
    return sync


def _collected(sync: Connection) -> list[dict[str, Any]] | None:
    """The rows collected in ``sync``'s transaction; None if it does not defer."""
    entry = sync.info.get(_COLLECTED)
    transaction = sync.get_transaction()  # the root one, inside a savepoint too
    if entry is None or transaction is None or entry[0] is not transaction:
        return None
    rows: list[dict[str, Any]] = entry[1]
    return rows


def _take(sync: Connection) -> list[dict[str, Any]]:
    rows = _collected(sync)
    if not rows:
        return []
    taken = list(rows)
    rows.clear()
    return taken


def _statement(sync: Connection, writes: list[Insert]) -> Executable:
    """``writes`` as one statement (data-modifying CTEs), waking the relay once the
    transaction commits: said once per transaction (a NOTIFY in a savepoint that is
    rolled back is undone with it: said again)."""
    transaction = sync.get_transaction()
    if sync.info.get(_NOTIFIED) is transaction:
        main, *rest = writes
        return main.add_cte(*(w.cte(f"write_{i}") for i, w in enumerate(rest)))
    if not sync.in_nested_transaction():
        sync.info[_NOTIFIED] = transaction
    wake = select(func.pg_notify(OUTBOX_CHANNEL, ""))
    return wake.add_cte(*(w.cte(f"write_{i}") for i, w in enumerate(writes)))


@event.listens_for(Engine, "savepoint")
@event.listens_for(Engine, "commit")
def _write_collected(sync: Connection, *_: Any) -> None:
    """Rows still collected when a savepoint begins (before it: a rollback to it must not
    undo them) or when the transaction commits are written then."""
    rows = _take(sync)
    if rows:
        sync.execute(_statement(sync, [insert(outbox).values(rows)]))


async def write_event(
    conn: AsyncConnection,
    topic: str,
    event: BaseModel,
    *,
    key: str,
    now: datetime,
    cause: Cause,
) -> str:
    """Write ``event`` in its validated envelope to the outbox in ``conn``'s
    transaction, as an effect of ``cause``; returns the new event id."""
    event_id = uuid.uuid4().hex
    envelope = new_envelope(
        event_type_of(type(event)),
        event,
        now=now,
        event_id=event_id,
        correlation_id=cause.correlation_id,
        causation_id=cause.event_id,
        saga_seq=cause.next_seq,
    )
    # every record carries a trace: its cause's, else the open span's, else a new one
    traceparent = cause.traceparent or tracing.current() or tracing.child_of(None)
    headers = [(tracing.TRACEPARENT, traceparent)]
    await write_raw(conn, topic, key.encode(), dump(envelope), headers)
    return event_id
