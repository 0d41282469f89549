"""Writing to the outbox: the only way any paysaga code emits an event.

Rows are written in the caller's transaction and published by the relay after commit,
so an event exists exactly when the state change that caused it does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime.tables import outbox
from services.runtime.wakeup import notify

#: NOTIFY channel the outbox relay of a database listens on
OUTBOX_CHANNEL = "paysaga_outbox"


def build_envelope(
    event_type: str,
    payload: BaseModel | Mapping[str, Any],
    *,
    now: datetime,
    causation_id: str | None,
    saga_seq: int,
    correlation_id: str | None,
) -> tuple[str, bytes]:
    """(event_id, serialized envelope) — the contract envelope plus causation/saga_seq."""
    body = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else dict(payload)
    event_id = uuid.uuid4().hex
    envelope = {
        "event_id": event_id,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "saga_seq": saga_seq,
        "payload": body,
    }
    return event_id, json.dumps(envelope, separators=(",", ":")).encode()


async def write_raw(
    conn: AsyncConnection,
    topic: str,
    key: bytes | None,
    value: bytes,
    headers: Sequence[tuple[str, str]] = (),
) -> None:
    await conn.execute(
        insert(outbox).values(topic=topic, key=key, value=value, headers=[list(h) for h in headers])
    )
    # delivered at commit, and only if the transaction commits; once per transaction
    transaction = conn.get_transaction()
    if conn.info.get("outbox_notified") is not transaction:
        await notify(conn, OUTBOX_CHANNEL)
        conn.info["outbox_notified"] = transaction


async def write_event(
    conn: AsyncConnection,
    topic: str,
    event_type: str,
    payload: BaseModel | Mapping[str, Any],
    *,
    key: str,
    now: datetime,
    causation_id: str | None,
    saga_seq: int,
    correlation_id: str | None = None,
) -> str:
    """Write one enveloped event to the outbox in ``conn``'s transaction; returns its id."""
    event_id, value = build_envelope(
        event_type,
        payload,
        now=now,
        causation_id=causation_id,
        saga_seq=saga_seq,
        correlation_id=correlation_id,
    )
    await write_raw(conn, topic, key.encode(), value)
    return event_id
