"""The idempotent producer after a sequence gap: the broker refuses the batch that
follows the gap with OutOfOrderSequenceNumber (what a batch that expired while the
broker restarted leaves behind; the bridge then answered 503 on two partitions until
it was restarted). The producer of the bridge and of dead letters is renewed after a
failed send: the failed record is the caller's error to retry, the next send lands."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from services.runtime.producer import RenewingProducer
from tests.conftest import Infra
from tests.integration.test_foundation import _create
from tests.support.harness import uid

pytestmark = pytest.mark.integration


def _gap(producer: RenewingProducer, tp: TopicPartition) -> None:
    """Skip sequence numbers as a batch that expired unsent does (aiokafka keeps them)."""
    connected = producer.connected
    assert connected is not None
    connected._txn_manager.increment_sequence_number(tp, 5)  # type: ignore[attr-defined]


async def _until_sent(producer: RenewingProducer, topic: str, value: bytes) -> int:
    """Send ``value`` again and again (as a gateway retries a 503) until acknowledged;
    the number of failed tries."""
    deadline, failed = time.monotonic() + 30, 0
    while True:
        try:
            await producer.send_and_wait(topic, value, b"order-1", [], timeout_s=5)
            return failed
        except (KafkaError, TimeoutError):
            failed += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # a retry's pace, not a wait for an outcome


async def _values(bootstrap: str, topic: str, n: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        out: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(out) < n and time.monotonic() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=1000)).values():
                out += [m.value or b"" for m in msgs]
        return out
    finally:
        await consumer.stop()


def test_a_send_after_a_sequence_gap_goes_through_a_new_producer(infra: Infra) -> None:
    topic = f"test.renew.{uid()}"

    async def run() -> tuple[int, int, list[bytes]]:
        await _create(infra.bootstrap, topic)
        producer = RenewingProducer(infra.bootstrap, "test-renewing", 5000)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"before", b"order-1", [], timeout_s=10)
            _gap(producer, TopicPartition(topic, 0))
            failed = await _until_sent(producer, topic, b"after the gap")
            await producer.send_and_wait(topic, b"later", b"order-1", [], timeout_s=10)
            generation = producer.generation
        finally:
            await producer.stop()
        return failed, generation, await _values(infra.bootstrap, topic, 3)

    failed, generation, values = asyncio.run(run())
    assert failed >= 1  # the gap was real: the broker refused the next batch
    assert generation == 2  # one renewal, not one per retry
    assert values == [b"before", b"after the gap", b"later"]  # nothing lost, none twice
