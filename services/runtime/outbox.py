"""Writing to the outbox: the only way any paysaga code emits an event.

Rows are written in the caller's transaction and published by the relay after commit,
so an event exists exactly when the state change that caused it does. An event is a
model of ``schemas.events`` / ``schemas.contract`` (its class name is its event type);
``write_event`` builds its validated envelope (``schemas.envelope.new_envelope``) from
the ``Cause`` — causation id, ``saga_seq``, correlation id, traceparent — and writes
the row. ``write_raw`` is for records that are not events of ours (a dead letter's
replay keeps the bytes it had).

In a transaction that applies a batch of records the rows are collected and written
with the batch's stored positions, in one statement (``deferred``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.envelope import dump, event_type_of, new_envelope
from services.runtime import deferred, tracing
from services.runtime.ids import new_event_id
from services.runtime.tables import outbox

#: NOTIFY channel the outbox relay of a database listens on
OUTBOX_CHANNEL = "paysaga_outbox"
#: ``conn.info`` key: outbox rows written on the connection so far (step latency)
OUTBOX_ROWS = "paysaga_outbox_rows"


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


#: the columns of an outbox row as written (``_row``; a statement built once binds them)
ROW_COLUMNS = ("topic", "key", "value", "headers")


def _row(
    topic: str, key: bytes | None, value: bytes, headers: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """The outbox row of a record: what ``write_raw`` inserts."""
    values = (topic, key, value, [list(h) for h in headers])
    return dict(zip(ROW_COLUMNS, values, strict=True))


async def write_raw(
    conn: AsyncConnection,
    topic: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    await _write(conn, _row(topic, key, value, headers))


async def _write(conn: AsyncConnection, row: dict[str, Any]) -> None:
    # delivered at commit, and only if the transaction commits
    await deferred.insert(conn, outbox, row, wake=OUTBOX_CHANNEL)
    conn.info[OUTBOX_ROWS] = conn.info.get(OUTBOX_ROWS, 0) + 1


def event_row(
    topic: str, event: BaseModel, *, key: str, now: datetime, cause: Cause
) -> tuple[str, dict[str, Any]]:
    """``event`` in its validated envelope, as an effect of ``cause``: its new event id
    and its outbox row."""
    event_id = new_event_id()
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
    return event_id, _row(topic, key.encode(), dump(envelope), headers)


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
    event_id, row = event_row(topic, event, key=key, now=now, cause=cause)
    await _write(conn, row)
    return event_id
