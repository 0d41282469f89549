"""A service's handlers driven as the runtime drives a batch, for tests that compare a
batch with one record at a time on real PostgreSQL: the records, their handlers called
with a ``Context``, and the statements sent meanwhile."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime.messages import Context, Handlers, Record, routes_of


def records(*events: tuple[str, str, bytes]) -> list[Record]:
    """(topic, key, value) as records of partition 0, offsets and timestamps in order."""
    return [
        Record(topic, 0, i, key.encode(), value, (), 1_700_000_000_000 + i)
        for i, (topic, key, value) in enumerate(events)
    ]


class Routed:
    """``handlers`` (topic -> event model -> handler), each record given to its own."""

    def __init__(self, handlers: Handlers, now: datetime) -> None:
        self.routes = {r.topic: r for r in routes_of(handlers)}
        self.now = now

    async def apply(self, conn: AsyncConnection, rec: Record) -> None:
        envelope = json.loads(rec.value)
        handler = self.routes[rec.topic].handlers[envelope["event_type"]]
        await handler(Context(conn=conn, record=rec, envelope=envelope, now=self.now))


@contextlib.contextmanager
def counted(engine: AsyncEngine) -> Iterator[list[str]]:
    """The statements ``engine`` sends meanwhile."""
    sent: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", note)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", note)
