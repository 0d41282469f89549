"""Intent leases and schedules are judged by the database's clock, not the worker's: a
worker whose clock runs ahead (or behind) of the others' cannot take over a live claim,
miss an expired one, or see a due intent as not due yet.

Real PostgreSQL (a database of the refunds schema per test); the gateway is never
called — the workers' claims and resolutions are driven directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from schemas.events import PaymentContext
from services.refunds import domain, store
from services.refunds.worker import RefundsMetrics, RefundsWorker
from services.runtime.gateway_client import GatewayClient
from services.runtime.intents.store import Claimed
from services.runtime.outbox import Cause
from services.runtime.topics import REFUNDS_TOPIC
from tests.conftest import Infra
from tests.integration.conftest import refunds_db
from tests.support.harness import query, uid

pytestmark = pytest.mark.integration

SKEW = timedelta(days=1)
LEASE = timedelta(seconds=120)


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with refunds_db(infra, "lease") as found:
        yield found


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayClient]:
    async with GatewayClient("http://127.0.0.1:9") as client:  # never called
        yield client


def worker(
    engine: AsyncEngine,
    gateway: GatewayClient,
    skew: timedelta = timedelta(0),
    lease: timedelta = LEASE,
) -> RefundsWorker:
    """A refunds worker whose clock is ``skew`` off the true time."""
    return RefundsWorker(
        engine,
        gateway,
        domain.RetryPolicy(10, 1.0, 60.0),
        RefundsMetrics.create(CollectorRegistry()),
        lease=lease,
        clock=lambda: datetime.now(UTC) + skew,
    )


async def record(engine: AsyncEngine, skew: timedelta = timedelta(0)) -> str:
    """Transaction A of a refund, on a host whose clock is ``skew`` off."""
    txn = uid("txn")
    context = PaymentContext(
        order_id=uid("ord"), attempt=1, payment_intent_id=uid("pi"), transaction_id=txn,
        flow="sale", amount=1250, currency="EUR", gateway="simgw",
    )  # fmt: skip
    intent = domain.decide_compensation("sale", "out_of_stock", txn)
    assert intent is not None
    async with engine.begin() as conn:
        now = datetime.now(UTC) + skew
        assert await store.record_intent(conn, context, intent, Cause(uid("evt"), 2, None), now)
    return txn


async def claimed_within(
    w: RefundsWorker, timeout: float, what: str
) -> list[Claimed[domain.Claim]]:
    """Poll ``w``'s claim until it claims something."""
    deadline = time.monotonic() + timeout
    while not (claimed := await w.claim_due()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.1)
    return claimed


async def claims_within(w: RefundsWorker, timeout: float, what: str) -> list[str]:
    """Poll ``w``'s claim until it claims something; its transaction ids."""
    return [c.claim.transaction_id for c in await claimed_within(w, timeout, what)]


def state(conninfo: str, txn: str) -> tuple[str, int]:
    rows = query(conninfo, "SELECT state, attempts FROM compensations WHERE transaction_id=%s", txn)
    return rows[0][0], rows[0][1]


async def test_a_worker_whose_clock_runs_ahead_does_not_take_over_a_live_claim(
    db: tuple[AsyncEngine, str], gateway: GatewayClient
) -> None:
    engine, conninfo = db
    txn = await record(engine)
    [held] = await worker(engine, gateway).claim_due()
    assert held.claim.transaction_id == txn

    # a day ahead, the lease looks long expired to this worker's own clock
    assert await worker(engine, gateway, skew=SKEW).claim_due() == []
    assert state(conninfo, txn) == ("in_flight", 1)
    # the holder still owns its claim: its transaction B is not fenced out
    assert await worker(engine, gateway).resolve(held, domain.Succeeded("re_1"))
    assert state(conninfo, txn) == ("succeeded", 1)


async def test_a_lease_that_ran_out_is_reclaimed_by_a_worker_whose_clock_runs_behind(
    db: tuple[AsyncEngine, str], gateway: GatewayClient
) -> None:
    engine, conninfo = db
    txn = await record(engine)
    dead = worker(engine, gateway, lease=timedelta(seconds=1))
    [lost] = await dead.claim_due()  # and its worker dies mid-call

    behind = worker(engine, gateway, skew=-SKEW)
    assert await claims_within(behind, 15, "the expired lease reclaimed") == [txn]
    assert state(conninfo, txn) == ("in_flight", 2)
    assert not await dead.resolve(lost, domain.Succeeded("re_1"))  # fenced out


async def test_a_resolution_writes_its_event_only_while_its_claim_holds(
    db: tuple[AsyncEngine, str], gateway: GatewayClient
) -> None:
    """A resolution and its event are one statement in autocommit: a round fenced out
    writes neither, the holder's writes its state and exactly one outbox row."""
    engine, conninfo = db
    txn = await record(engine)
    dead = worker(engine, gateway, lease=timedelta(seconds=1))
    [lost] = await dead.claim_due()
    live = worker(engine, gateway)
    [held] = await claimed_within(live, 15, "the expired lease reclaimed")

    assert not await dead.resolve(lost, domain.Succeeded("re_lost"))
    assert state(conninfo, txn) == ("in_flight", 2)
    assert query(conninfo, "SELECT count(*) FROM outbox")[0][0] == 0

    assert await live.resolve(held, domain.Succeeded("re_1"))
    assert state(conninfo, txn) == ("succeeded", 2)
    [(topic, key, value)] = query(conninfo, "SELECT topic, key, value FROM outbox")
    envelope = json.loads(bytes(value))
    assert (topic, bytes(key).decode()) == (REFUNDS_TOPIC, held.context.order_id)
    assert envelope["event_type"] == "RefundSucceeded"
    assert envelope["payload"]["refund_id"] == "re_1"
    assert envelope["causation_id"] == held.cause.event_id
    # a second resolution of the same claim is fenced: the row is final already
    assert not await live.resolve(held, domain.Succeeded("re_2"))
    assert query(conninfo, "SELECT count(*) FROM outbox")[0][0] == 1


async def test_an_intent_is_due_on_the_database_clock_whoever_scheduled_it(
    db: tuple[AsyncEngine, str], gateway: GatewayClient
) -> None:
    """Recorded by a host a day ahead, an intent is due at once; a retry scheduled by a
    worker a day ahead is due after its delay, not a day later."""
    engine, conninfo = db
    txn = await record(engine, skew=SKEW)
    [claimed] = await worker(engine, gateway).claim_due()
    assert claimed.claim.transaction_id == txn

    ahead = worker(engine, gateway, skew=SKEW)
    retry = domain.Retry(ahead.clock() + timedelta(seconds=1), "timeout")
    assert await ahead.resolve(claimed, retry)
    assert state(conninfo, txn) == ("unknown", 1)
    assert await claims_within(worker(engine, gateway), 15, "the retry due") == [txn]
    assert state(conninfo, txn) == ("in_flight", 2)


async def test_the_claim_reads_its_partial_indexes_even_under_a_generic_plan(
    db: tuple[AsyncEngine, str], gateway: GatewayClient
) -> None:
    """psycopg prepares a statement that runs often, and PostgreSQL may then plan it once
    for any parameters: a state written as a parameter could not match the partial
    indexes' predicates, and every claim would scan the whole intent table, which only
    grows. Here every statement is prepared at once and planned generically."""
    engine, conninfo = db
    for _ in range(300):
        await record(engine)
    query(conninfo, "UPDATE compensations SET state = 'succeeded' RETURNING 1")  # settled
    due = await record(engine)
    generic = create_async_engine(
        engine.url,
        pool_size=1,
        max_overflow=0,
        connect_args={"prepare_threshold": 0, "options": "-c plan_cache_mode=force_generic_plan"},
    )
    try:
        async with generic.connect() as conn:
            await conn.exec_driver_sql("ANALYZE compensations")
        [claimed] = await worker(generic, gateway).claim_due()
        assert claimed.claim.transaction_id == due
        async with generic.connect() as conn:  # the same connection: its prepared statements
            prepared = (
                await conn.exec_driver_sql(
                    "SELECT name, cardinality(parameter_types) FROM pg_prepared_statements"
                    " WHERE statement LIKE '%%WITH due AS%%'"
                    " AND statement NOT LIKE '%%pg_prepared_statements%%'"
                )
            ).all()
            assert len(prepared) == 1, prepared
            [(name, n)] = prepared
            nulls = ", ".join(["NULL"] * n)
            plan = "\n".join(
                r[0] for r in await conn.exec_driver_sql(f"EXPLAIN EXECUTE {name}({nulls})")
            )
    finally:
        await generic.dispose()
    assert "ix_compensations_due" in plan, plan
    assert "Seq Scan on compensations" not in plan, plan
