"""The consumer runtime's position and progress bookkeeping, against a scripted
partition log (no broker, no database)."""

from __future__ import annotations

import asyncio
import time

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from services.runtime.consumer import ConsumerRuntime, RuntimeSettings, _Listener, lanes_of
from services.runtime.messages import Record
from services.runtime.metrics import RuntimeMetrics

TP = TopicPartition("t", 0)


class FakeConsumer:
    """One partition whose log holds ``offsets`` (the others: compacted away, transaction
    markers, or below the log start)."""

    def __init__(self, offsets: list[int], position: int, high: int) -> None:
        self.offsets, self.pos, self.high, self.seeks = offsets, position, high, 0

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.pos, self.seeks = offset, self.seeks + 1

    def fetch(self) -> list[Record]:
        out = [o for o in self.offsets if o >= self.pos]
        self.pos = out[-1] + 1 if out else self.pos
        return [Record("t", 0, o, b"k", b"{}", (), 0) for o in out]

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.offsets[0] for tp in tps}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.high for tp in tps}

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def highwater(self, tp: TopicPartition) -> int:
        return self.high

    async def position(self, tp: TopicPartition) -> int:
        return self.pos


def runtime(consumer: FakeConsumer, stored: int | None) -> ConsumerRuntime:
    rt = ConsumerRuntime(
        service="svc",
        group="g",
        routes=[],
        engine=None,  # type: ignore[arg-type]
        bootstrap="",
        producer=None,  # type: ignore[arg-type]
        metrics=RuntimeMetrics.create(CollectorRegistry()),
        settings=RuntimeSettings(stall_after_s=120),
    )

    async def stored_position(tp: TopicPartition) -> int | None:
        return stored

    rt.positions.stored = stored_position  # type: ignore[method-assign]
    rt._consumer = consumer  # type: ignore[assignment]
    return rt


async def test_a_stored_position_in_a_gap_continues_after_the_gap() -> None:
    # processed up to 100; 101 is a transaction marker (or was compacted away)
    consumer = FakeConsumer([99, 100, 102, 103], position=101, high=104)
    rt = runtime(consumer, stored=101)
    rt.positions.expected[TP] = 101  # consuming on: the position is loaded
    got = [r.offset for r in await rt.positions.in_position(TP, consumer.fetch())]
    assert got == [102, 103]
    assert consumer.seeks == 0


async def test_a_consumer_placed_elsewhere_is_sought_back_once() -> None:
    # the consumer starts above the stored position (e.g. at a later Kafka commit)
    consumer = FakeConsumer([99, 100, 102, 103], position=103, high=104)
    rt = runtime(consumer, stored=101)
    assert await rt.positions.in_position(TP, consumer.fetch()) == []
    assert (consumer.seeks, consumer.pos) == (1, 101)
    for _ in range(3):  # Kafka answers 102 for 101: taken, not sought again
        got = [r.offset for r in await rt.positions.in_position(TP, consumer.fetch())]
        if got:
            break
    assert got == [102, 103]
    assert consumer.seeks == 1


async def test_records_below_the_stored_position_are_dropped() -> None:
    consumer = FakeConsumer([98, 99, 100, 101], position=98, high=102)
    rt = runtime(consumer, stored=100)
    assert [r.offset for r in await rt.positions.in_position(TP, consumer.fetch())] == [100, 101]


async def test_a_batch_all_below_a_position_within_the_log_is_dropped_without_alarm() -> None:
    # read again after a rebalance (Kafka's committed offset lags the stored position)
    consumer = FakeConsumer([98, 99, 100, 101], position=98, high=102)
    rt = runtime(consumer, stored=100)
    rt.positions.expected[TP] = 100
    assert await rt.positions.in_position(TP, consumer.fetch()[:2]) == []
    assert consumer.seeks == 0
    assert rt.position_problems() == []


async def test_a_position_below_the_log_start_continues_from_the_log_start() -> None:
    consumer = FakeConsumer([50, 51], position=50, high=52)  # 0..49 expired
    rt = runtime(consumer, stored=10)
    rt.positions.expected[TP] = 10  # already loaded: the fetch was reset to the log start
    assert [r.offset for r in await rt.positions.in_position(TP, consumer.fetch())] == [50, 51]
    lost = rt.metrics.records.labels("svc", "t", "lost_to_retention")._value.get()
    assert lost == 40


async def test_not_ready_while_records_wait_and_no_position_advances() -> None:
    consumer = FakeConsumer([0, 1, 2], position=0, high=3)
    rt = runtime(consumer, stored=None)
    rt.last_progress = time.time() - 121  # polling went on, nothing was processed
    await rt._update_lag()  # lag 3: polling is not progress
    assert not rt.ready()

    consumer.fetch()  # everything was read and processed: no lag
    await rt._update_lag()
    assert rt.ready()


async def test_idle_consumer_without_lag_stays_ready() -> None:
    consumer = FakeConsumer([0], position=1, high=1)
    rt = runtime(consumer, stored=1)
    rt.last_progress = time.time() - 1000
    await rt._update_lag()
    assert rt.ready()


def test_one_orders_partitions_share_a_lane_in_fetch_order() -> None:
    def batch(topic: str, partition: int) -> tuple[TopicPartition, list[Record]]:
        return TopicPartition(topic, partition), [Record(topic, partition, 0, b"k", b"{}", (), 0)]

    fetched = [batch("a", 0), batch("b", 1), batch("b", 3), batch("a", 4), batch("c", 0)]
    lanes = lanes_of(fetched, 3)
    assert [[(tp.topic, tp.partition) for tp, _ in lane] for lane in lanes] == [
        [("a", 0), ("b", 3), ("c", 0)],
        [("b", 1), ("a", 4)],
    ]
    assert lanes_of(fetched, 1) == [fetched]  # one lane: everything as fetched


class CommittingConsumer(FakeConsumer):
    """Holds ``assigned``; records each Kafka offset commit."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        super().__init__([0], position=0, high=0)
        self.assigned, self.commits = assigned, list[dict[TopicPartition, int]]()

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


async def test_kafka_commits_are_merged_and_made_at_most_every_commit_every_s() -> None:
    tp1 = TopicPartition("t", 1)
    consumer = CommittingConsumer({TP, tp1})
    rt = runtime(consumer, stored=None)
    rt.settings.commit_every_s = 0.3
    for nxt in range(1, 21):  # twenty polls in a row, both partitions moving
        rt.uncommitted.update({TP: nxt, tp1: 100 + nxt})
        await rt._commit_kafka()
    assert consumer.commits == [{TP: 1, tp1: 101}]  # the first at once, the rest wait
    deadline = time.monotonic() + 10
    while len(consumer.commits) < 2:  # idle polls: the rest once due
        assert time.monotonic() < deadline, "the pending offsets were never committed"
        await asyncio.sleep(0.02)
        await rt._commit_kafka()
    assert consumer.commits[1] == {TP: 20, tp1: 120}
    assert rt.uncommitted == {}
    rt.uncommitted[TP] = 21
    await rt._commit_kafka(now=True)  # shutdown: not waiting
    assert consumer.commits[2] == {TP: 21}


async def test_revoked_partitions_are_committed_at_once_and_the_others_wait() -> None:
    tp1, tp2 = TopicPartition("t", 1), TopicPartition("t", 2)
    consumer = CommittingConsumer({TP, tp1})  # tp2 is no longer this member's
    rt = runtime(consumer, stored=None)
    rt.settings.commit_every_s = 3600
    rt.uncommitted.update({TP: 5, tp1: 7, tp2: 9})
    await _Listener(rt).on_partitions_revoked({TP, tp2})
    assert consumer.commits == [{TP: 5}]  # tp2 dropped: its new owner commits its own
    assert rt.uncommitted == {tp1: 7}
