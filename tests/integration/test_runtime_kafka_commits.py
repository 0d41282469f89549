"""The Kafka offset commit is informational (lag tooling; the database holds the
positions): a burst processed in many polls is committed about once a
``commit_every_s``, not once a poll, and the committed offset still reaches the log
end while the consumer idles. The ledger service's consumer runs in this process
against the real Kafka and PostgreSQL; its commits and polls are counted on their way
to the broker."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.runtime.consumer import RuntimeSettings
from tests.integration.conftest import Ledger
from tests.integration.test_runtime_guarantees import stored_position
from tests.integration.test_runtime_positions import committed_offset
from tests.support.harness import credit, produce

pytestmark = pytest.mark.integration

RECORDS = 300
MAX_BATCH = 5  # 60 polls at least


def test_a_burst_in_many_polls_is_committed_to_kafka_about_once_a_second(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = ledger.infra.bootstrap
    tp = TopicPartition(ledger.in_topic, 0)
    burst = [credit("k1", i) for i in range(RECORDS)]
    asyncio.run(produce(b, ledger.in_topic, burst, partition=0))

    polls: list[float] = []  # when a poll returned records
    commits: list[tuple[float, dict[TopicPartition, int]]] = []
    getmany, commit = AIOKafkaConsumer.getmany, AIOKafkaConsumer.commit

    async def counted_getmany(self: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
        got = await getmany(self, *args, **kwargs)
        if got:
            polls.append(time.monotonic())
        return got

    async def counted_commit(self: AIOKafkaConsumer, offsets: Any = None) -> None:
        commits.append((time.monotonic(), dict(offsets or {})))
        await commit(self, offsets)

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", counted_getmany)
    monkeypatch.setattr(AIOKafkaConsumer, "commit", counted_commit)
    settings = RuntimeSettings(max_batch=MAX_BATCH, poll_timeout_ms=100, commit_every_s=1.0)

    async def kafka_committed() -> int | None:
        try:
            return await committed_offset(b, ledger.group, tp)
        except KafkaError:  # a fresh broker's coordinator, not there yet
            return None

    async def consume() -> None:
        svc, rt = ledger.runtime(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(rt.run(stop))
        try:
            deadline = time.monotonic() + 90
            while await asyncio.to_thread(stored_position, ledger, 0) != RECORDS:
                assert not task.done(), task
                assert time.monotonic() < deadline, "the burst was not processed"
                await asyncio.sleep(0.2)
            # the burst done, the consumer idles: its commit follows (not the shutdown's)
            while await kafka_committed() != RECORDS:
                assert not task.done(), task
                assert time.monotonic() < deadline, f"Kafka commit: {commits[-3:]}"
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            await svc.engine.dispose()

    asyncio.run(consume())
    assert stored_position(ledger, 0) == RECORDS
    assert len(polls) >= RECORDS // MAX_BATCH
    assert len(commits) <= len(polls) // 4, (len(commits), len(polls))
    times = [t for t, _ in commits]
    spacing = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(s >= 0.95 * settings.commit_every_s for s in spacing), spacing
    committed = [offsets[tp] for _, offsets in commits if tp in offsets]
    assert committed == sorted(committed)  # never behind an earlier commit
    assert committed[-1] == RECORDS
