"""Attacks on the orders projection's batch state (``store.prefetch``, ``deferred``):
keys that are not their events' order ids, and hostile values through the collected
writes — each stored as one event at a time stores it (a savepoint rolled back inside a
batch: ``test_orders_batch_state.py``). On a real PostgreSQL, through the projection's handlers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert, select, text

from services.orders import store
from services.runtime import deferred
from services.runtime.positions import save_positions
from tests.conftest import Infra
from tests.integration.conftest import service_db
from tests.integration.test_orders_batch_state import TP, Applier, authorization_path, stored
from tests.integration.test_orders_projection import Saga
from tests.support.batches import records

pytestmark = pytest.mark.asyncio


async def test_events_keyed_by_another_order_store_what_one_at_a_time_stores(
    infra: Infra,
) -> None:
    """Each saga's events carry the other saga's order id as their record key (the
    contract keys them alike; a producer may not): the batch locks and reads the keys'
    orders, the events' own orders on the way — held events released as one at a
    time releases them."""
    a, b = Saga(), Saga()
    events = [
        (topic, b.order_id, value) for topic, _, value in authorization_path(a, reserved_first=True)
    ]
    events += [(t, a.order_id, v) for t, _, v in authorization_path(b, reserved_first=True)]
    events.insert(2, (events[-1][0], "no-such-order", events.pop()[2]))  # an unknown key too
    batch = records(*events)
    async with (
        service_db(infra, "orders", "keyed") as (batched, _),
        service_db(infra, "orders", "keyeds") as (single, _),
    ):
        await Applier().batch(batched, batch)
        await Applier().one_at_a_time(single, batch)
        result = await stored(batched)
        assert result == await stored(single)
    assert sorted(r[2] for r in result["orders"]) == ["PAID_CONFIRMED"] * 2
    assert result["held"] == []


HOSTILE: list[dict[str, Any]] = [
    {"reason": "%(w0_reason)s %s %% '; DROP TABLE orders; --", "details": [1, [2, [3]]]},
    {"reason": None, "details": {"k": None, "l": [], "e": "é\u2028\U0001f4b8"}},
    {"reason": "x" * 64, "details": "a JSON string"},
    {"reason": "\\N", "details": None},
    {"reason": "{}", "details": [None]},
]


async def test_hostile_values_through_collected_writes_are_stored_as_written(
    infra: Infra,
) -> None:
    """Odd strings, NULLs, JSON documents that are lists, strings or null: collected
    and written by the batch's statement exactly as a plain insert writes them."""
    at = datetime(2026, 12, 2, tzinfo=UTC)

    def row(i: int, prefix: str, v: dict[str, Any]) -> dict[str, Any]:
        return {
            "event_id": f"{prefix}{i}",
            "occurred_at": at,
            "recorded_at": at,
            "subject": "s",
            "action": "a",
            "outcome": "o",
            "reason": v["reason"],
            "order_id": None if i % 2 else f"ord_{i}",
            "transaction_id": None,
            "gateway_event_id": None,
            "details": v["details"],
        }

    async with service_db(infra, "orders", "hostile") as (engine, _):
        async with engine.begin() as conn:
            deferred.defer(conn)
            for i, v in enumerate(HOSTILE):
                await deferred.insert(conn, store.audit_log, row(i, "d", v), unique=["event_id"])
            await save_positions(conn, "orders", {TP: 1})
        async with engine.begin() as conn:
            for i, v in enumerate(HOSTILE):
                await conn.execute(insert(store.audit_log).values(row(i, "p", v)))
        async with engine.connect() as conn:
            c = store.audit_log.c
            found = (
                await conn.execute(
                    select(
                        c.event_id, c.reason, c.order_id, c.details, text("details::text")
                    ).order_by(c.event_id)
                )
            ).all()
    by_prefix: dict[str, list[tuple[Any, ...]]] = {"d": [], "p": []}
    for r in found:
        by_prefix[r.event_id[0]].append((r.event_id[1:], *r[1:]))
    assert by_prefix["d"] == by_prefix["p"]
    assert [r[1] for r in by_prefix["d"]] == [v["reason"] for v in HOSTILE]
