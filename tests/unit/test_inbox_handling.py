"""One claimed record through ``Inbox.handle``: its handler runs inside a span that
continues the record's trace, and a handler that overruns ``handler_timeout_s`` is cut
off with ``TimeoutError`` (the batch's transaction then rolls back and the record is
retried), not left to hold the partition. No database: the record's inbox key is
claimed already, as ``KeyBlocking.load`` does for a batch."""

from __future__ import annotations

import asyncio
import types
from typing import Any, cast

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime import tracing
from services.runtime.inbox import Claims, Inbox
from services.runtime.messages import Context, Record, Route

PARENT = tracing.child_of(None)


def record() -> Record:
    return Record(
        topic="raw.v1",
        partition=0,
        offset=7,
        key=b"ord_1",
        value=b"{}",
        headers=((tracing.TRACEPARENT, PARENT.encode()),),
        timestamp_ms=0,
    )


def claimed(inbox: Inbox, rec: Record) -> Claims:
    claims = inbox.claimable([rec])
    claims.entered.add("dedupe-1")
    return claims


def inbox_with(handler: Any, timeout_s: float) -> Inbox:
    route = Route("raw.v1", raw_handler=handler, dedupe_key=lambda rec: "dedupe-1")
    return Inbox("paysaga.test", [route], handler_timeout_s=timeout_s)


#: the connection a handler is given: only its ``info`` is read here
CONN = cast(AsyncConnection, types.SimpleNamespace(info={}))


async def test_the_handler_runs_in_a_span_of_the_records_trace() -> None:
    seen: list[Context] = []

    async def handler(ctx: Context) -> None:
        seen.append(ctx)
        assert tracing.current() == ctx.traceparent

    inbox = inbox_with(handler, timeout_s=5)
    rec = record()
    assert await inbox.handle(CONN, rec, claimed(inbox, rec)) == "processed"
    [ctx] = seen
    own, parent = tracing.parse(ctx.traceparent), tracing.parse(PARENT)
    assert own is not None
    assert parent is not None
    assert own[0] == parent[0]  # the same trace
    assert own[1] != parent[1]  # a span of its own
    assert tracing.current() is None  # closed with the record


async def test_a_second_copy_of_a_claimed_key_is_a_duplicate() -> None:
    calls: list[Context] = []

    async def handler(ctx: Context) -> None:
        calls.append(ctx)

    inbox = inbox_with(handler, timeout_s=5)
    rec = record()
    claims = claimed(inbox, rec)
    assert await inbox.handle(CONN, rec, claims) == "processed"
    assert await inbox.handle(CONN, rec, claims) == "duplicate"
    assert len(calls) == 1


async def test_a_handler_that_overruns_its_timeout_is_cut_off() -> None:
    cancelled: list[bool] = []

    async def handler(ctx: Context) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    inbox = inbox_with(handler, timeout_s=0.05)
    rec = record()
    with pytest.raises(TimeoutError):
        await inbox.handle(CONN, rec, claimed(inbox, rec))
    assert cancelled == [True]  # cut off, not slept through
