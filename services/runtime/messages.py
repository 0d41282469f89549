"""What a handler sees: the consumed record, its envelope, the open transaction, and
``emit`` — which writes to the outbox in that same transaction (handlers never produce
to Kafka)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.envelope import event_type_of
from services.runtime.outbox import Cause, write_event


@dataclasses.dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def at(self) -> tuple[str, int, int]:
        """Where the record is: (topic, partition, offset), one record of a batch."""
        return self.topic, self.partition, self.offset

    @property
    def key_str(self) -> str | None:
        return self.key.decode("utf-8", "replace") if self.key is not None else None

    @classmethod
    def from_kafka(cls, m: Any) -> Record:
        """The record of an aiokafka ``ConsumerRecord``."""
        return cls(
            topic=m.topic,
            partition=m.partition,
            offset=m.offset,
            key=m.key,
            value=m.value if m.value is not None else b"",
            headers=tuple((k, bytes(v or b"")) for k, v in (m.headers or ())),
            timestamp_ms=int(m.timestamp),
        )


@dataclasses.dataclass
class Context:
    """One record being handled inside its service's database transaction."""

    conn: AsyncConnection
    record: Record
    envelope: dict[str, Any] | None
    now: datetime
    #: the span handling the record (``services.runtime.tracing``): what it emits
    #: continues the record's trace
    traceparent: str | None = None

    @property
    def event_id(self) -> str | None:
        return None if self.envelope is None else str(self.envelope["event_id"])

    @property
    def payload(self) -> dict[str, Any]:
        assert self.envelope is not None, "raw records have no envelope payload"
        payload: dict[str, Any] = self.envelope["payload"]
        return payload

    @property
    def cause(self) -> Cause:
        """The consumed record as the cause of what the handler emits: its event id (for
        a raw record, topic/partition/offset), its ``saga_seq``, correlation id and the
        traceparent of the span handling it."""
        envelope = self.envelope or {}
        seq = envelope.get("saga_seq")
        correlation = envelope.get("correlation_id")
        return Cause(
            event_id=self.event_id or _record_id(self.record),
            saga_seq=int(seq) if seq else None,
            correlation_id=str(correlation) if correlation is not None else None,
            traceparent=self.traceparent,
        )

    async def emit(
        self, topic: str, event: BaseModel, *, key: str, cause: Cause | None = None
    ) -> str:
        """Write ``event`` to the outbox (committed with the handler's state, or not at
        all), as an effect of ``cause`` — by default the consumed record
        (``self.cause``). Returns the new event id."""
        return await write_event(
            self.conn, topic, event, key=key, now=self.now, cause=cause or self.cause
        )


def _record_id(record: Record) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"


Handler = Callable[[Context], Awaitable[None]]

#: Called in a batch's transaction before its records are handled, with the records
#: its handlers will be given: a service reads (and locks) in one statement what they
#: are about, where each handler would read its own (``services/orders/store.py``)
BatchHook = Callable[[AsyncConnection, Sequence[Record]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Route:
    """How one topic is consumed.

    Enveloped topics route by ``event_type`` (types not listed are acknowledged and
    counted as skipped: a topic carries several types) and dedupe by ``event_id``.
    Raw topics (the gateway's webhook bodies) go to ``raw_handler`` and dedupe by
    ``dedupe_key(record)``.
    """

    topic: str
    handlers: Mapping[str, Handler] = dataclasses.field(default_factory=dict)
    raw_handler: Handler | None = None
    dedupe_key: Callable[[Record], str] | None = None


#: How every service registers its handlers: topic → event model (``schemas.events``)
#: → handler (a unit test checks the tables against topics.yaml and
#: docs/saga-events.md); ``routes_of`` makes the consumer's routes.
Handlers = Mapping[str, Mapping[type[BaseModel], Handler]]


def routes_of(handlers: Handlers) -> list[Route]:
    """The routes of enveloped topics, one per topic of ``handlers``, keyed by each
    model's event type (``schemas.envelope.event_type_of``)."""
    return [
        Route(topic, handlers={event_type_of(model): h for model, h in by_model.items()})
        for topic, by_model in handlers.items()
    ]
