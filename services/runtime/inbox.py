"""Applying one record once: its route (which handler, which inbox key) and the inbox
row that dedupes it, written in the transaction that runs the handler.

An enveloped topic routes by ``event_type`` and dedupes by ``event_id``; a raw topic
(the gateway's webhook bodies) goes to its ``raw_handler`` and dedupes by the route's
``dedupe_key(record)``. A record whose inbox key is entered already for this consumer
group changes nothing (``duplicate``). A batch enters the keys of its records in one
statement before applying them (``claimable``, ``KeyBlocking.load``); a record outside
a claim enters its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime import deferred
from services.runtime.errors import PermanentError
from services.runtime.faults import fault_point
from services.runtime.logs import bound
from services.runtime.messages import Context, Handler, Record, Route
from services.runtime.metrics import note_step
from services.runtime.outbox import OUTBOX_ROWS
from services.runtime.tables import inbox
from services.runtime.tracing import TRACEPARENT, span, trace_id_of

#: (handler — None for an event type the group ignores, inbox key, envelope)
Routed = tuple[Handler | None, str, dict[str, Any] | None]


@dataclasses.dataclass
class Claims:
    """The inbox keys of a batch's records, entered in one statement before the records
    are applied (``KeyBlocking.load``), in the batch's transaction: ``entered`` the keys new
    to the inbox, each handed to the first record that carries it (``take``); ``routes``
    each claimed record's route, so its envelope is parsed once."""

    routes: dict[tuple[str, int, int], Routed] = dataclasses.field(default_factory=dict)
    entered: set[str] = dataclasses.field(default_factory=set)

    def fresh(self, records: Sequence[Record]) -> list[Record]:
        """Those of ``records`` that go to their handler: claimed, and new to the inbox
        (before any is applied)."""
        return [
            r for r in records if (at := r.at) in self.routes and self.routes[at][1] in self.entered
        ]

    def take(self, key: str) -> bool:
        """Whether a claimed record with ``key`` is the first with it, new to the inbox:
        apply it; every other copy is a duplicate."""
        if key in self.entered:
            self.entered.discard(key)
            return True
        return False


class Inbox:
    """The routes and the inbox of one consumer group."""

    def __init__(self, group: str, routes: Sequence[Route], handler_timeout_s: float) -> None:
        self.group = group
        self.routes = {r.topic: r for r in routes}
        self.handler_timeout_s = handler_timeout_s

    def route(self, rec: Record) -> Routed:
        """(handler — None for an event type this group ignores, inbox key, envelope)."""
        route = self.routes.get(rec.topic)
        if route is None:
            raise PermanentError("unrouted_topic", rec.topic)
        if route.raw_handler is not None:
            assert route.dedupe_key is not None
            return route.raw_handler, route.dedupe_key(rec), None
        envelope = parse_envelope(rec.value)
        return route.handlers.get(str(envelope["event_type"])), str(envelope["event_id"]), envelope

    def ignores(self, rec: Record) -> bool:
        """Whether this group ignores ``rec``: it routes, to no handler (an event type
        of the topic that the group does not consume). Such a record changes nothing —
        not the inbox, not behind a dead letter — only the position moves past it."""
        try:
            return self.route(rec)[0] is None
        except Exception:
            return False  # it is handled as what it is: invalid, dead-lettered

    def dedupe_key(self, rec: Record) -> str | None:
        """The inbox key of a record, None if it has none (it is not even an envelope)."""
        try:
            return self.route(rec)[1]
        except Exception:
            return None

    def claimable(self, records: Sequence[Record]) -> Claims:
        """The claims of ``records`` before their keys are entered (``KeyBlocking.load``
        enters them, in ``conn``'s transaction — which then applies every one of them or
        rolls back): the routes of the records this group handles. A record that does not
        route (``handle`` raises its error) or that the group ignores is not claimed."""
        claims = Claims()
        for rec in records:
            try:
                routed = self.route(rec)
            except PermanentError:
                continue
            if routed[0] is not None:
                claims.routes[rec.at] = routed
        return claims

    async def handle(self, conn: AsyncConnection, rec: Record, claims: Claims | None = None) -> str:
        """Enter the record's inbox key — unless ``claims`` entered it — and run its
        handler, in ``conn``'s transaction; the outcome label (``processed``,
        ``duplicate``, ``skipped``)."""
        claimed = claims.routes.get(rec.at) if claims is not None else None
        handler, dedupe, envelope = claimed or self.route(rec)
        if handler is None:
            return "skipped"
        # a span per handled record, child of the record's trace (a new one without);
        # what the handler emits carries it, and its log lines the record's ids
        parent = rec.header(TRACEPARENT)
        with (
            span(f"{self.group} {rec.topic}", parent, {"paysaga.dedupe_key": dedupe}) as tp,
            bound(**log_fields(rec, envelope), trace_id=trace_id_of(tp)),
        ):
            if claimed is not None:
                assert claims is not None
                if not claims.take(dedupe):
                    return "duplicate"
            elif not await self.enter(conn, {dedupe}):
                return "duplicate"
            now = datetime.now(UTC)
            ctx = Context(conn=conn, record=rec, envelope=envelope, now=now, traceparent=tp)
            written = conn.info.get(OUTBOX_ROWS, 0)
            # bounded: a handler slower than max_poll_interval would cost the partition
            # (a timeout scope, not wait_for: no task of its own per record)
            async with asyncio.timeout(self.handler_timeout_s):
                await handler(ctx)
            if conn.info.get(OUTBOX_ROWS, 0) > written:  # event in -> event out
                event_type = str(envelope["event_type"]) if envelope else rec.topic
                note_step(conn, event_type, rec.timestamp_ms)
            fault_point("inside_db_transaction")
            return "processed"

    def log_fields(self, rec: Record) -> dict[str, str | None]:
        """What the log lines about ``rec`` are bound to (``log_fields``), its envelope
        parsed if it has one."""
        try:
            envelope = self.route(rec)[2]
        except Exception:
            envelope = None
        return log_fields(rec, envelope)

    async def contains(self, conn: AsyncConnection, rec: Record) -> bool:
        """Whether the record's inbox key is entered (it was applied)."""
        key = self.dedupe_key(rec)
        if key is None:
            return False
        found = await conn.execute(
            select(inbox.c.dedupe_key).where(
                inbox.c.consumer_group == self.group, inbox.c.dedupe_key == key
            )
        )
        return found.first() is not None

    async def enter(self, conn: AsyncConnection, keys: set[str]) -> set[str]:
        """Enter inbox keys in one statement (sorted: two members entering overlapping
        keys wait in one order), in ``conn``'s transaction; the keys that were new: a
        record's own key, the keys of resolved dead letters (their other copies are
        duplicates from then on). A batch's claim enters its keys in the statement that
        reads its blocked keys (``KeyBlocking.load``), in the same order."""
        if not keys:
            return set()
        rows = [{"consumer_group": self.group, "dedupe_key": k} for k in sorted(keys)]
        entered = await conn.execute(
            pg_insert(inbox)
            .from_select(list(rows[0]), deferred.unnested(inbox, rows))
            .on_conflict_do_nothing()
            .returning(inbox.c.dedupe_key)
        )
        return set(entered.scalars())


def log_fields(rec: Record, envelope: dict[str, Any] | None) -> dict[str, str | None]:
    """A record's ids for its log lines: its order id, event id (a raw record's
    topic/partition/offset) and correlation id, as far as it has them."""
    env = envelope or {}
    payload = env.get("payload")
    order_id = payload.get("order_id") if isinstance(payload, dict) else None
    correlation = env.get("correlation_id")
    return {
        "order_id": str(order_id) if order_id is not None else None,
        "event_id": str(env.get("event_id") or f"{rec.topic}/{rec.partition}/{rec.offset}"),
        "correlation_id": str(correlation) if correlation is not None else None,
    }


def parse_envelope(value: bytes) -> dict[str, Any]:
    """Decode and minimally check an envelope; payloads are validated by handlers."""
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise PermanentError("invalid_json", str(exc)) from exc
    if not isinstance(doc, dict):
        raise PermanentError("invalid_envelope", "record value is not a JSON object")
    for field in ("event_id", "event_type", "payload"):
        if field not in doc:
            raise PermanentError("invalid_envelope", f"missing field {field!r}")
    if not isinstance(doc["event_id"], str) or not 1 <= len(doc["event_id"]) <= 64:
        raise PermanentError("invalid_envelope", "event_id must be a string of 1..64 chars")
    if not isinstance(doc["payload"], dict):
        raise PermanentError("invalid_envelope", "payload must be an object")
    return doc
