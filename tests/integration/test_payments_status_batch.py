"""Payments records a batch's published statuses in one statement before the batch is
applied (``PaymentsHandlers.prepare``, ``store.record_saga_statuses``): the same orders
and the same emitted records as one status at a time — for the statuses that change
nothing but the mirror, up to an order's first that may change more (PAYMENT_FAILED),
never for an order with a retry in the batch or pending, or unknown.

Real PostgreSQL: two databases at the payments schema, through the payments handlers."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.contract import OrderStatus, OrderStatusChanged, PaymentRetryRequested
from schemas.envelope import dump, new_envelope
from schemas.events import PaymentIntentCreated
from services.payments import store
from services.payments.handlers import PaymentsHandlers
from services.payments.metrics import Metrics
from services.runtime import deferred, dlq
from services.runtime.batches import BatchProcessor
from services.runtime.blocking import KeyBlocking
from services.runtime.inbox import Inbox
from services.runtime.messages import Record, routes_of
from services.runtime.metrics import RuntimeMetrics
from services.runtime.topics import CHECKOUT_ORDERS_TOPIC, PAYMENTS_TOPIC, STATUS_TOPIC
from tests.conftest import Infra
from tests.integration.conftest import service_db
from tests.support.batches import Routed, counted, records
from tests.support.payments import make_order

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
_ids = itertools.count()


def status(
    order_id: str,
    version: int,
    name: str,
    intent: str | None,
    *,
    key: str | None = None,
    event_id: str | None = None,
) -> tuple[str, str, bytes]:
    changed = OrderStatusChanged(
        order_id=order_id,
        status=OrderStatus(name),
        previous_status=None,
        reason=None,
        payment_intent_id=intent,
        transaction_id=None,
        amount=10345,
        currency="EUR",
        version=version,
    )
    event_id = event_id or f"ev_{next(_ids)}"
    envelope = new_envelope("OrderStatusChanged", changed, now=NOW, event_id=event_id)
    return STATUS_TOPIC, key or order_id, dump(envelope)


def retry(
    order_id: str, intent: str, *, key: str | None = None, event_id: str | None = None
) -> tuple[str, str, bytes]:
    asked = PaymentRetryRequested(
        order_id=order_id, payment_intent_id=intent, payment_method="card"
    )
    event_id = event_id or f"ev_{next(_ids)}"
    envelope = new_envelope("PaymentRetryRequested", asked, now=NOW, event_id=event_id)
    return CHECKOUT_ORDERS_TOPIC, key or order_id, dump(envelope)


def intent_created(order_id: str, intent: str) -> tuple[str, str, bytes]:
    created = PaymentIntentCreated(order_id=order_id, attempt=1, payment_intent_id=intent)
    envelope = new_envelope("PaymentIntentCreated", created, now=NOW, event_id=f"ev_{next(_ids)}")
    return PAYMENTS_TOPIC, order_id, dump(envelope)


class Applier(Routed):
    """The payments handlers, called as the runtime calls them."""

    def __init__(self) -> None:
        self.handlers = PaymentsHandlers(
            secrets={},
            tolerance_s=300,
            unmatched_window=timedelta(days=1),
            metrics=Metrics.create(CollectorRegistry()),
        )
        super().__init__(self.handlers.handlers(), NOW)

    async def batch(self, engine: AsyncEngine, batch: list[Record]) -> None:
        async with engine.begin() as conn:
            deferred.defer(conn)
            await self.handlers.prepare(conn, batch)
            for rec in batch:
                await self.apply(conn, rec)

    async def one_at_a_time(self, engine: AsyncEngine, batch: list[Record]) -> None:
        for rec in batch:
            async with engine.begin() as conn:
                deferred.defer(conn)
                await self.apply(conn, rec)


async def seed(engine: AsyncEngine) -> None:
    """Orders in the states the scenarios start from."""
    async with engine.begin() as conn:
        for order in (
            make_order(order_id="ord_a", payment_intent_id="pi_a", status="accepted"),
            make_order(
                order_id="ord_b",
                payment_intent_id="pi_b2",
                attempt=2,
                status="accepted",
                earlier_intents=("pi_b1",),
            ),
            make_order(order_id="ord_c", payment_intent_id="pi_c", status="accepted"),
            make_order(order_id="ord_d", payment_intent_id="pi_d", status="accepted"),
            make_order(order_id="ord_e", payment_intent_id="pi_e", status="failed"),
            make_order(order_id="ord_f", payment_intent_id="pi_f", status="accepted"),
        ):
            assert await store.insert_order(conn, order)
        await store.set_order_fields(conn, "ord_b", saga_version=2, saga_status="PENDING_PAYMENT")
        pending = {"payment_intent_id": "pi_c2", "payment_method": "card", "event_id": "ev_held"}
        await store.set_order_fields(conn, "ord_c", pending_retry=pending)
        await store.set_order_fields(conn, "ord_e", saga_version=3, saga_status="PAYMENT_FAILED")


def scenario() -> list[tuple[str, str, bytes]]:
    return [
        # ord_a: the happy path, and a stale copy of a status
        status("ord_a", 1, "PENDING_PAYMENT", "pi_a"),
        status("ord_a", 2, "PAYMENT_AUTHORIZED", "pi_a"),
        status("ord_c", 1, "PAYMENT_AUTHORIZED", "pi_c"),  # a retry pending: one by one
        status("ord_a", 3, "INVENTORY_RESERVED", "pi_a"),
        status("ord_a", 2, "PAYMENT_AUTHORIZED", "pi_a"),
        status("ord_a", 4, "PAID_CONFIRMED", "pi_a"),
        # ord_b: stale, then an earlier attempt's (its version only), then the current's
        status("ord_b", 1, "PENDING_PAYMENT", "pi_b2"),
        status("ord_b", 3, "REFUNDED", "pi_b1"),
        status("ord_b", 4, "PAYMENT_AUTHORIZED", "pi_b2"),
        # ord_c: failed, so the pending retry is accepted: a new attempt
        status("ord_c", 2, "PAYMENT_FAILED", "pi_c"),
        # ord_d: recorded up to its PAYMENT_FAILED; that one and the next one by one
        status("ord_d", 1, "PAYMENT_AUTHORIZED", "pi_d"),
        status("ord_d", 2, "PAYMENT_FAILED", "pi_d"),
        status("ord_d", 3, "REFUND_PENDING", "pi_d"),
        # ord_e: a retry in the batch, accepted; then a status of the attempt before it
        # (recorded before the retry, it would hold the retry instead)
        retry("ord_e", "pi_e2"),
        status("ord_e", 4, "REFUND_PENDING", "pi_e"),
        # ord_f: a status that does not parse leaves the next one to one by one
        (STATUS_TOPIC, "ord_f", b'{"event_id": "ev_bad", "event_type": "OrderStatusChanged"}'),
        status("ord_f", 1, "PAYMENT_AUTHORIZED", "pi_f"),
        # an order payments does not know
        status("ord_x", 1, "PAYMENT_AUTHORIZED", "pi_x"),
    ]


_MALFORMED = "ev_bad"


def applicable(batch: list[Record]) -> list[Record]:
    """The batch without the record its handler rejects (the runtime dead-letters it)."""
    return [r for r in batch if _MALFORMED.encode() not in r.value]


_ORDERS = (
    "SELECT order_id, attempt, payment_intent_id, status, saga_status, saga_version,"
    " pending_retry FROM orders ORDER BY order_id"
)


async def stored(engine: AsyncEngine) -> dict[str, list[Any]]:
    async with engine.connect() as conn:
        orders = [tuple(r) for r in await conn.execute(text(_ORDERS))]
        emitted = await conn.execute(text("SELECT topic, key, value FROM outbox ORDER BY id"))
        out = [(r.topic, r.key, json.loads(r.value)["payload"]) for r in emitted]
    return {"orders": orders, "emitted": out}


async def test_the_statuses_recorded_at_once_leave_what_one_at_a_time_leaves(
    infra: Infra,
) -> None:
    batch = records(*scenario())
    async with (
        service_db(infra, "payments", "sbatch") as (batched, _),
        service_db(infra, "payments", "ssingle") as (single, _),
    ):
        await seed(batched)
        await seed(single)
        with counted(batched) as sent:
            await Applier().batch(batched, applicable(batch))
        with counted(single) as sent_singly:
            await Applier().one_at_a_time(single, applicable(batch))
        result = await stored(batched)
        assert result == await stored(single)
    orders = {r[0]: r[1:] for r in result["orders"]}
    assert orders["ord_a"] == (1, "pi_a", "accepted", "PAID_CONFIRMED", 4, None)
    assert orders["ord_b"] == (2, "pi_b2", "accepted", "PAYMENT_AUTHORIZED", 4, None)
    assert orders["ord_c"] == (2, "pi_c2", "pending", None, 2, None)  # the retry accepted
    assert orders["ord_d"] == (1, "pi_d", "failed", "REFUND_PENDING", 3, None)
    assert orders["ord_e"] == (2, "pi_e2", "pending", None, 4, None)
    assert orders["ord_f"] == (1, "pi_f", "accepted", "PAYMENT_AUTHORIZED", 1, None)
    assert "ord_x" not in orders
    # one at a time, a statement per status that may change nothing but the mirror (all
    # but the two PAYMENT_FAILED); in the batch, one for ord_a's five, ord_b's three,
    # ord_d's first and ord_f's, and one each for the four it leaves (ord_c's with a retry
    # pending, ord_d's after its PAYMENT_FAILED, ord_e's beside a retry, ord_x's)
    assert sum(map(_records_one_status, sent_singly)) == 14
    assert sum(map(_records_one_status, sent)) == 4
    assert sum("unnest(CAST(%(order_ids)s" in s for s in sent) == 1


def _records_one_status(statement: str) -> bool:
    """``store.record_saga_status``'s statement."""
    return statement.startswith("UPDATE orders SET saga_status=CASE WHEN")


async def test_the_statement_before_the_batch_records_only_what_it_may(infra: Infra) -> None:
    """What ``prepare`` alone leaves (the handlers not run): an order recorded up to its
    first status that may change more, and nothing of an order it must leave."""
    async with service_db(infra, "payments", "sprep") as (engine, _):
        await seed(engine)
        async with engine.begin() as conn:
            deferred.defer(conn)
            await Applier().handlers.prepare(conn, records(*scenario()))
        found = {r[0]: r[1:] for r in (await stored(engine))["orders"]}
    assert found["ord_a"][3:5] == ("PAID_CONFIRMED", 4)
    assert found["ord_b"][3:5] == ("PAYMENT_AUTHORIZED", 4)
    assert found["ord_c"][3:5] == (None, 0)  # a retry pending
    assert found["ord_d"][3:5] == ("PAYMENT_AUTHORIZED", 1)  # up to its PAYMENT_FAILED
    assert found["ord_e"][3:5] == ("PAYMENT_FAILED", 3)  # a retry in the batch
    assert found["ord_f"][3:5] == (None, 0)  # after a status that does not parse
    assert "ord_x" not in found


async def test_the_store_settles_what_one_status_at_a_time_settles(infra: Infra) -> None:
    """``record_saga_statuses`` against ``record_saga_status`` in turn, on the same rows:
    the same rows, and settled exactly the orders where each status was recorded or
    stale."""
    statuses = [
        ("ord_a", 3, "pi_a", "INVENTORY_RESERVED"),
        ("ord_a", 2, "pi_a", "PAYMENT_AUTHORIZED"),
        ("ord_a", 5, "pi_old", "REFUNDED"),
        ("ord_b", 1, "pi_b2", "PENDING_PAYMENT"),  # stale: settled, nothing written
        ("ord_c", 1, "pi_c", "PAYMENT_AUTHORIZED"),  # a retry pending
        ("ord_x", 1, "pi_x", "PAYMENT_AUTHORIZED"),  # unknown
    ]
    async with (
        service_db(infra, "payments", "sstore") as (batched, _),
        service_db(infra, "payments", "sturn") as (single, _),
    ):
        await seed(batched)
        await seed(single)
        async with batched.begin() as conn:
            settled = await store.record_saga_statuses(conn, statuses)
        async with single.begin() as conn:
            for s in statuses:
                await store.record_saga_status(conn, *s)
        assert (await stored(batched))["orders"] == (await stored(single))["orders"]
        found = {r[0]: r[1:] for r in (await stored(batched))["orders"]}
    assert settled == {"ord_a", "ord_b"}
    assert found["ord_a"][3:5] == ("INVENTORY_RESERVED", 5)
    assert found["ord_b"][3:5] == ("PENDING_PAYMENT", 2)


async def test_statuses_out_of_version_order_leave_what_one_at_a_time_leaves(
    infra: Infra,
) -> None:
    """A status whose version is not newer than one before it in the batch is stale when
    its turn comes, even if it is newer than the stored one: not recorded — though the
    newer one before it was about an earlier attempt, or had the same version."""
    first = records(
        # ord_b: the current attempt's 4, an earlier attempt's 6, a stale current 5
        status("ord_b", 4, "PAYMENT_AUTHORIZED", "pi_b2"),
        status("ord_b", 6, "REFUNDED", "pi_b1"),
        status("ord_b", 5, "NEEDS_RECONCILIATION", "pi_b2"),
        # ord_a: two statuses of one version, the first one is recorded
        status("ord_a", 1, "PAYMENT_AUTHORIZED", "pi_a"),
        status("ord_a", 1, "NEEDS_RECONCILIATION", "pi_a"),
    )
    # then the customers retry: held (the attempts are in flight), not refused
    then = records(retry("ord_b", "pi_b3"), retry("ord_a", "pi_a2"))
    async with (
        service_db(infra, "payments", "sorder") as (batched, _),
        service_db(infra, "payments", "sorder1") as (single, _),
    ):
        await seed(batched)
        await seed(single)
        for batch in (first, then):
            await Applier().batch(batched, batch)
            await Applier().one_at_a_time(single, batch)
        result = await stored(batched)
        assert result == await stored(single)
    orders = {r[0]: r[1:] for r in result["orders"]}
    assert orders["ord_b"][3:5] == ("PAYMENT_AUTHORIZED", 6)
    assert orders["ord_a"][3:5] == ("PAYMENT_AUTHORIZED", 1)
    held = [o for o, row in orders.items() if row[5] is not None]
    assert held == ["ord_a", "ord_b", "ord_c"]  # ord_c's from before


GROUP = "paysaga.payments"
T = TypeVar("T")


class _Member:
    """A member that keeps its partitions (``BatchProcessor`` asks on retries only)."""

    consumer = None

    def owns(self, tp: TopicPartition, fetched: int) -> bool:
        return True

    async def backoff(self, attempt: int) -> None:
        return None

    async def until_done(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        return await step()


def processor(engine: AsyncEngine, *, prepared: bool) -> BatchProcessor:
    """The runtime's batch processor over the payments routes: with the handlers'
    ``prepare``, or (``prepared=False``) applying the batch's records one after another."""
    handlers = Applier().handlers
    inbox = Inbox(GROUP, routes_of(handlers.handlers()), 30.0)
    metrics = RuntimeMetrics.create(CollectorRegistry())
    producer = cast(dlq.DeadLetterProducer, None)  # no record is dead-lettered here
    blocking = KeyBlocking(
        group=GROUP, service="payments", inbox=inbox, producer=producer, metrics=metrics
    )
    return BatchProcessor(
        group=GROUP,
        service="payments",
        engine=engine,
        inbox=inbox,
        blocking=blocking,
        producer=producer,
        metrics=metrics,
        retry_budget_s=1.0,
        member=_Member(),
        prepare=handlers.prepare if prepared else None,
    )


async def test_a_copy_of_an_event_id_is_a_duplicate_beside_the_statement_too(
    infra: Infra,
) -> None:
    """Two records with one event id (one inbox key): the first is applied, the other
    is a duplicate — whatever it says, and on whichever topic the first came."""
    batch = records(
        status("ord_a", 1, "PAYMENT_AUTHORIZED", "pi_a", event_id="ev_twice"),
        status("ord_a", 2, "NEEDS_RECONCILIATION", "pi_a", event_id="ev_twice"),
        retry("ord_e", "pi_e2", event_id="ev_shared"),
        status("ord_f", 1, "NEEDS_RECONCILIATION", "pi_f", event_id="ev_shared"),
    )
    tp = TopicPartition(STATUS_TOPIC, 0)
    async with (
        service_db(infra, "payments", "sdup") as (batched, _),
        service_db(infra, "payments", "sdup1") as (single, _),
    ):
        await seed(batched)
        await seed(single)
        assert await processor(batched, prepared=True).process(tp, batch, 0)
        assert await processor(single, prepared=False).process(tp, batch, 0)
        result = await stored(batched)
        assert result == await stored(single)
    orders = {r[0]: r[1:] for r in result["orders"]}
    assert orders["ord_a"][3:5] == ("PAYMENT_AUTHORIZED", 1)
    assert orders["ord_f"][3:5] == (None, 0)


async def test_a_record_about_another_order_than_its_key_is_applied_in_its_turn(
    infra: Infra,
) -> None:
    """A status or retry whose payload names another order than its key: the order's
    records may then come on several partitions, applied in the order they were written
    (a lane), not in the order the batch lists them."""
    at = 1_700_000_000_000

    def rec(event: tuple[str, str, bytes], partition: int, written: int) -> Record:
        topic, key, value = event
        return Record(topic, partition, 0, key.encode(), value, (), at + written)

    work = [
        # ord_a's 2 keyed by another order, on another partition, written after its 1
        (rec(status("ord_a", 2, "INVENTORY_RESERVED", "pi_a", key="ord_k"), 0, 10)),
        (rec(status("ord_a", 1, "PAYMENT_FAILED", "pi_a"), 1, 5)),
        # a retry of ord_e keyed by another order, then a status of ord_e's attempt
        (rec(retry("ord_e", "pi_e2", key="ord_k2"), 0, 1)),
        (rec(status("ord_e", 4, "REFUND_PENDING", "pi_e"), 2, 2)),
    ]
    lane = [(TopicPartition(r.topic, r.partition), [r]) for r in work]
    fetched = {tp: 0 for tp, _ in lane}
    async with (
        service_db(infra, "payments", "skey") as (batched, _),
        service_db(infra, "payments", "skey1") as (single, _),
    ):
        await seed(batched)
        await seed(single)
        assert all((await processor(batched, prepared=True).process_lane(lane, fetched)).values())
        assert all((await processor(single, prepared=False).process_lane(lane, fetched)).values())
        result = await stored(batched)
        assert result == await stored(single)
    orders = {r[0]: r[1:] for r in result["orders"]}
    assert orders["ord_a"][2:5] == ("failed", "INVENTORY_RESERVED", 2)
    assert orders["ord_e"][:5] == (2, "pi_e2", "pending", None, 4)  # the retry accepted


async def _waiting_for_a_lock(engine: AsyncEngine) -> None:
    """Until a transaction in the engine's database waits for a lock."""
    deadline = time.monotonic() + 10
    query = text(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND database ="
        " (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    while time.monotonic() < deadline:
        async with engine.connect() as conn:
            if (await conn.execute(query)).scalar():
                return
        await asyncio.sleep(0.02)
    raise AssertionError("no transaction waits for a lock")


async def test_the_batch_takes_an_intent_lock_before_its_order_row_as_one_by_one(
    infra: Infra,
) -> None:
    """A record that takes an intent's lock (PaymentIntentCreated, a confirmation) and a
    status of its order in one batch: the intent's lock is taken before the order's row,
    as a confirmation applied meanwhile takes them — no deadlock."""
    batch = records(
        intent_created("ord_a", "pi_a"), status("ord_a", 1, "PAYMENT_AUTHORIZED", "pi_a")
    )
    async with service_db(infra, "payments", "slock") as (engine, _):
        await seed(engine)
        async with engine.connect() as other:
            async with other.begin():
                await store.lock_intent(other, "pi_a")  # a confirmation of ord_a's payment
                applied = asyncio.create_task(Applier().batch(engine, batch))
                await _waiting_for_a_lock(engine)  # the batch waits for the intent
                assert await asyncio.wait_for(store.load_order(other, "ord_a"), 10) is not None
            await asyncio.wait_for(applied, 10)
        found = {r[0]: r[1:] for r in (await stored(engine))["orders"]}
    assert found["ord_a"][3:5] == ("PAYMENT_AUTHORIZED", 1)
