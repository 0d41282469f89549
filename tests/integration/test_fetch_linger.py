"""The fetch wait set on a running consumer is what its next fetch requests ask the real
broker for (``services.runtime.linger.apply`` on aiokafka's own fetcher), and a consumer
runtime sets it by its record rate."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaClient, AIOKafkaConsumer, TopicPartition
from aiokafka.protocol.fetch import FetchRequest

from services.runtime.consumer import RuntimeSettings
from services.runtime.linger import FetchWait, apply, settable
from tests.conftest import Infra
from tests.integration.conftest import Ledger
from tests.integration.test_runtime_guarantees import stored_position
from tests.support.harness import create_topic, credit, produce, uid


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(min bytes, max wait ms) of every fetch request any client sends to the broker."""
    seen: list[tuple[int, int]] = []
    send = AIOKafkaClient.send

    async def observed(self: AIOKafkaClient, node_id: int, request: Any, **kw: Any) -> Any:
        if isinstance(request, FetchRequest):
            seen.append((request._min_bytes, request._max_wait_ms))
        return await send(self, node_id, request, **kw)

    monkeypatch.setattr(AIOKafkaClient, "send", observed)
    return seen


async def _sent_with(
    consumer: AIOKafkaConsumer, sent: list[tuple[int, int]], want: FetchWait
) -> None:
    """Poll until a fetch request asking for ``want`` went to the broker (a deadline)."""
    deadline = time.monotonic() + 15
    while (want.min_bytes, want.max_wait_ms) not in sent:
        assert time.monotonic() < deadline, f"no fetch request for {want}: {sent[-5:]}"
        await consumer.getmany(timeout_ms=100)


async def test_fetch_requests_carry_the_wait_applied_to_the_running_consumer(
    infra: Infra, sent: list[tuple[int, int]]
) -> None:
    topic = uid("linger")
    await create_topic(infra.bootstrap, topic, partitions=1)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=infra.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=200
    )
    await consumer.start()
    try:
        assert settable(consumer)
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_end()
        await _sent_with(consumer, sent, FetchWait(1, 200))  # as built
        busy = FetchWait(min_bytes=16384, max_wait_ms=100)
        apply(consumer, busy)
        await _sent_with(consumer, sent, busy)
        at = len(sent)
        deadline = time.monotonic() + 15
        while len(sent) < at + 3:  # the requests after it ask for the same wait
            assert time.monotonic() < deadline, sent
            await consumer.getmany(timeout_ms=100)
        assert set(sent[at:]) == {(16384, 100)}
        apply(consumer, FetchWait(min_bytes=1, max_wait_ms=200))
        sent.clear()
        await _sent_with(consumer, sent, FetchWait(1, 200))
    finally:
        await consumer.stop()


def test_a_busy_consumer_runtime_lingers_and_goes_quiet_when_its_records_stop(
    ledger: Ledger, sent: list[tuple[int, int]]
) -> None:
    """The wiring: the ledger service's consumer, run in this process against the real
    broker with a low threshold, asks for the lingering wait while records keep coming
    and for the quiet one once they stop; every record is applied either way."""
    b = ledger.infra.bootstrap
    settings = RuntimeSettings(
        poll_timeout_ms=100,
        fetch_linger_above_per_s=20,
        fetch_linger_min_bytes=16384,
        fetch_linger_ms=100,
    )

    async def consume() -> int:
        svc, rt = ledger.runtime(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(rt.run(stop))
        produced = 0
        try:
            deadline = time.monotonic() + 60
            while (16384, 100) not in sent:  # records keep coming, 100 a poll of 0.2 s
                assert not task.done(), task
                assert time.monotonic() < deadline, f"never lingered: {sent[-5:]}"
                batch = [credit("k1", produced + i) for i in range(100)]
                await produce(b, ledger.in_topic, batch, partition=0)
                produced += len(batch)
                await asyncio.sleep(0.2)  # the pace of the load, not a wait for an outcome
            lingered_at = len(sent)
            while (1, 500) not in sent[lingered_at:]:  # they stopped: quiet again
                assert not task.done(), task
                assert time.monotonic() < deadline, f"never quiet again: {sent[-5:]}"
                await asyncio.sleep(0.2)
            while await asyncio.to_thread(stored_position, ledger, 0) != produced:
                assert time.monotonic() < deadline, "the records were not all applied"
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await svc.engine.dispose()
        return produced

    produced = asyncio.run(consume())
    assert stored_position(ledger, 0) == produced
