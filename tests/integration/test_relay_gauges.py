"""The relay's gauges (backlog, oldest age, stuck rows) come from one aggregate over the
outbox, read at most every ``stats_every_s`` rather than on every wake-up: a burst of
notifications takes many passes and few reads, the gauges still settle once the relay
goes idle (no further notification needed), and a row set aside dead shows at once.

Real PostgreSQL (a database of the refunds schema) and the real broker; the relay runs
in this process."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.metrics import RuntimeMetrics
from services.runtime.relay import OutboxRelay, RelaySettings
from tests.conftest import Infra
from tests.integration.conftest import refunds_db
from tests.support.harness import create_topic, query, uid

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with refunds_db(infra, "gauges") as found:
        yield found


def relay_of(infra: Infra, db: tuple[AsyncEngine, str], **settings: float) -> OutboxRelay:
    engine, conninfo = db
    return OutboxRelay(
        service="refunds",
        engine=engine,
        conninfo=conninfo,
        bootstrap=infra.bootstrap,
        metrics=RuntimeMetrics.create(CollectorRegistry()),
        settings=RelaySettings(**settings),
    )


def gauge(relay: OutboxRelay, which: str, state: str | None = None) -> float:
    metric = {"backlog": relay.metrics.outbox_backlog, "stuck": relay.metrics.outbox_stuck}[which]
    labels = (relay.service,) if state is None else (relay.service, state)
    return float(metric.labels(*labels)._value.get())


def write_row(conninfo: str, topic: str) -> int:
    """One outbox row and its NOTIFY in one transaction, as a handler commits it."""
    sql = (
        "WITH w AS (INSERT INTO outbox (topic, key, value) VALUES (%s, %s, %s) RETURNING id),"
        " n AS (SELECT pg_notify('paysaga_outbox', '')) SELECT id, (SELECT 1 FROM n) FROM w"
    )
    return int(query(conninfo, sql, topic, b"k", b'{"n": 1}')[0][0])


def unsent(conninfo: str) -> int:
    return int(query(conninfo, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")[0][0])


async def until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def counted(relay: OutboxRelay, name: str, *, done: bool = False) -> list[float]:
    """When ``relay``'s method ``name`` was called (``done``: when each call returned)."""
    calls: list[float] = []
    method: Callable[..., Awaitable[object]] = getattr(relay, name)

    async def wrapped(*args: object) -> object:
        if not done:
            calls.append(time.monotonic())
        try:
            return await method(*args)
        finally:
            if done:
                calls.append(time.monotonic())

    setattr(relay, name, wrapped)
    return calls


async def test_a_burst_takes_many_passes_and_few_gauge_reads_and_the_gauges_settle(
    infra: Infra, db: tuple[AsyncEngine, str]
) -> None:
    _, conninfo = db
    topic = f"test.relay.{uid()}"
    await create_topic(infra.bootstrap, topic, 1)
    for _ in range(3):  # waiting when the relay takes the lead: the gauge reads 3
        write_row(conninfo, topic)
    # no fallback poll within the test: only notifications and the gauges wake it
    relay = relay_of(infra, db, poll_s=600, stats_every_s=1.0)
    # a read counts once it returned: its gauges are set then
    passes = counted(relay, "_publish_batch")
    reads = counted(relay, "_update_backlog", done=True)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await until(lambda: unsent(conninfo) == 0, "the first rows published")
        for _ in range(20):  # one notification each, one after another
            write_row(conninfo, topic)
            await until(lambda: unsent(conninfo) == 0, "the row published")
        idle_since = time.monotonic()
        # no notification comes any more: the gauges are read after the last pass
        # started (it published the last row) within stats_every_s anyway
        await until(lambda: reads[-1] >= passes[-1], "the gauges read after the last pass", 5)
        settled = time.monotonic() - idle_since
    finally:
        stop.set()
        task.cancel()  # it waits up to poll_s for a notification, as at a service's stop
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert gauge(relay, "backlog") == 0
    assert len(passes) >= 21, passes
    burst_s = reads[-1] - reads[0]
    assert len(reads) <= burst_s / 1.0 + 2, (len(reads), len(passes), burst_s)
    assert len(reads) < len(passes) / 2, (len(reads), len(passes))
    assert relay.metrics.outbox_oldest_age.labels("refunds")._value.get() == 0
    assert settled < 3, settled


async def test_a_row_set_aside_dead_shows_in_the_gauges_at_once(
    infra: Infra, db: tuple[AsyncEngine, str]
) -> None:
    _, conninfo = db
    relay = relay_of(infra, db, stats_every_s=3600)
    relay._producer = await relay._start_producer()
    try:
        await relay._publish_batch()  # the gauges read: nothing waits
        assert gauge(relay, "stuck", "dead") == 0
        # Kafka refuses the row for good (an illegal topic name): set aside as dead
        bad = f"no such topic {uuid.uuid4().hex}"
        [(row_id,)] = query(
            conninfo,
            "INSERT INTO outbox (topic, key, value) VALUES (%s, 'k', '{}') RETURNING id",
            bad,
        )
        await relay._publish_batch()
    finally:
        await relay._producer.stop()
    [(dead,)] = query(conninfo, "SELECT dead_at IS NOT NULL FROM outbox WHERE id = %s", row_id)
    assert dead
    assert gauge(relay, "stuck", "dead") == 1  # within the pass, not stats_every_s later
    assert gauge(relay, "backlog") == 1
