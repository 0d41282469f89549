"""What a handler sees: the consumed record, its envelope, the open transaction, and
``emit`` — which writes to the outbox in that same transaction (handlers never produce
to Kafka)."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime.outbox import write_event


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

    @property
    def event_id(self) -> str | None:
        return None if self.envelope is None else str(self.envelope["event_id"])

    @property
    def payload(self) -> dict[str, Any]:
        assert self.envelope is not None, "raw records have no envelope payload"
        payload: dict[str, Any] = self.envelope["payload"]
        return payload

    async def emit(
        self,
        topic: str,
        event_type: str,
        payload: BaseModel | Mapping[str, Any],
        *,
        key: str,
        saga_seq: int | None = None,
        causation_id: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Write one event to the outbox (committed with the handler's state, or not at
        all). ``saga_seq`` defaults to the cause's + 1 (1 for a root); causation and
        correlation default to the consumed record's. Returns the new event id."""
        cause = self.envelope or {}
        if saga_seq is None:
            saga_seq = int(cause["saga_seq"]) + 1 if cause.get("saga_seq") else 1
        return await write_event(
            self.conn,
            topic,
            event_type,
            payload,
            key=key,
            now=self.now,
            saga_seq=saga_seq,
            causation_id=causation_id or self.event_id or _record_id(self.record),
            correlation_id=correlation_id or cause.get("correlation_id"),
        )


def _record_id(record: Record) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"


Handler = Callable[[Context], Awaitable[None]]


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
