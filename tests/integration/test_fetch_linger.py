"""The fetch wait set on a running consumer is what its next fetch requests ask the real
broker for (``services.runtime.linger.apply`` on aiokafka's own fetcher)."""

from __future__ import annotations

import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.protocol.fetch import FetchRequest

from services.runtime.linger import FetchWait, apply, settable
from tests.conftest import Infra
from tests.support.harness import create_topic, uid


async def _sent_with(
    consumer: AIOKafkaConsumer, sent: list[tuple[int, int]], want: FetchWait
) -> None:
    """Poll until a fetch request asking for ``want`` went to the broker (a deadline)."""
    deadline = time.monotonic() + 15
    while (want.min_bytes, want.max_wait_ms) not in sent:
        assert time.monotonic() < deadline, f"no fetch request for {want}: {sent[-5:]}"
        await consumer.getmany(timeout_ms=100)


async def test_fetch_requests_carry_the_wait_applied_to_the_running_consumer(
    infra: Infra,
) -> None:
    topic = uid("linger")
    await create_topic(infra.bootstrap, topic, partitions=1)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=infra.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=200
    )
    await consumer.start()
    sent: list[tuple[int, int]] = []
    send = consumer._client.send

    async def observed(node_id: int, request: Any, **kwargs: Any) -> Any:
        if isinstance(request, FetchRequest):
            sent.append((request._min_bytes, request._max_wait_ms))
        return await send(node_id, request, **kwargs)

    consumer._client.send = observed
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
