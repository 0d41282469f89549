"""The consumer loop: the processing rule of docs/architecture.md over aiokafka.

Where each part lives: this module runs the Kafka loop (membership, polling, pausing
while a record is retried, lag and readiness); ``positions.py`` keeps the stored
positions and their anomalies; ``batches.py`` processes a batch (one transaction, one
record at a time on failure, the retry budget, the dead letter); ``inbox.py`` routes a
record and dedupes it; ``blocking.py`` blocks a dead letter's key, stores the records
behind it (blocked records) and releases them (the control channel).

Guarantees:

* Every record is handled inside one transaction of the service's database that also
  writes its inbox row (dedupe), its outbox rows (emitted events) and the consumer
  position. State, emitted events and position commit together or not at all; the
  Kafka offset commit afterwards is informational (lag tooling): the offsets moved are
  committed together at most every ``commit_every_s`` (idle polls included), at once
  for partitions being revoked and on shutdown. It never runs ahead of the stored
  positions; lagging, it only costs a re-read that the stored position drops.
* A batch of records the group ignores, every one (event types it does not consume),
  has nothing to write but the position: it is taken without a transaction, and the
  positions past such batches are stored in one write within
  ``skipped_position_every_s`` (or with the partition's next applied batch). A crash
  meanwhile re-reads them, to be ignored again; a partition the group never stored a
  position for stores it at once.
* On assignment the consumer seeks to the position stored in the database, so a crash
  at any point re-delivers only records whose transaction did not commit.
* A duplicate (same dedupe key for this consumer group) is acknowledged and changes
  nothing — this also absorbs an outbox relay re-publishing after a crash, and a
  partition processed by two members around a rebalance.
* A batch that fails is re-run one record at a time to isolate the bad record.
  Permanent errors go to the group's dead-letter topic at once; transient errors are
  retried with exponential backoff and jitter (partitions paused, polls continuing so
  the group membership stays healthy) until ``retry_budget_s``, then dead-lettered.
  Only by the partition's owner: once the partition is revoked (a rebalance during the
  retries), the member stops and leaves the record to the new owner; and a record whose
  inbox key is entered (the new owner applied it meanwhile) counts as applied. Both are
  checked before each retry, before the dead letter is published and in the transaction
  that records it.
* Once a record of an order key is dead-lettered, later records of that key for this
  group are blocked (stored, not processed) until a replay of the dead letter succeeds
  or an operator purges it (``paysaga dlq``): replay never applies events out of order.
  Released blocked records are applied in order; one that fails permanently then
  becomes the key's dead letter and blocks the rest. A replay or purge acts only while
  the dead letter it names is open, so repeating one is harmless.
* A position that does not fit the log is never taken silently. A stored position
  beyond the log end (a recreated topic) is reset to the log start — the records below
  it are new to the group, and the inbox absorbs any it applied; records older than the
  inbox retention, which it could not absorb, are not re-read — with an error line, a
  metric and ``/readyz`` red until the partition caught up; a partition without a
  stored position logs where it starts (``Positions._no_stored_position``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import dlq
from services.runtime.batches import BatchProcessor
from services.runtime.blocking import DeadLetterHook, KeyBlocking
from services.runtime.errors import said
from services.runtime.faults import fault_point
from services.runtime.inbox import Inbox
from services.runtime.kafka import client_options
from services.runtime.linger import FetchWait, Linger, apply, settable
from services.runtime.messages import BatchHook, Record, Route
from services.runtime.metrics import RuntimeMetrics
from services.runtime.positions import Positions
from services.runtime.retry import backoff_s

__all__ = ["ConsumerRuntime", "RuntimeSettings"]

log = logging.getLogger("paysaga.consumer")
T = TypeVar("T")


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    max_batch: int = 500
    #: partition batches of one poll applied side by side (``lanes_of``), each lane on a
    #: connection of its own; a service whose records of different orders share rows
    #: (inventory's stock) runs one. One by default: where the services share two cores
    #: with Kafka and PostgreSQL, three lanes made smaller transactions and doubled the
    #: latency (README, Performance); lanes pay where cores are left for waits to overlap
    partition_lanes: int = 1
    poll_timeout_ms: int = 500
    retry_budget_s: float = 60.0
    retry_base_s: float = 0.2
    retry_max_s: float = 5.0
    handler_timeout_s: float = 30.0
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    #: not ready when records wait (lag > 0) and no stored position advanced for this long
    stall_after_s: float = 120.0
    #: how long the stored position of a partition may stay behind records the group
    #: ignores (``Positions.skip``): they are stored in one write at most this often
    skipped_position_every_s: float = 1.0
    #: how often the offsets moved are committed to Kafka, in one commit: informational
    #: (lag tooling), the database holds the positions; a commit per poll costs a round trip
    commit_every_s: float = 1.0
    #: a fetch waits at the broker until this many bytes are there, or ``fetch_max_wait_ms``:
    #: under load, fewer and fuller fetches (and batches); idle, a record waits that long
    fetch_min_bytes: int = 1
    fetch_max_wait_ms: int = 500
    #: above this many records/s (over a second), the consumer's fetches wait instead
    #: until ``fetch_linger_min_bytes`` are there or ``fetch_linger_ms`` (``linger.py``):
    #: fewer and fuller batches where each record would be a transaction of its own.
    #: Payments and orders consume 7-8 records per order: at 10 orders/s (bursts past
    #: 100/s) a threshold of 100 lingered for nothing, p50 70 -> 190 ms; at 150 the
    #: busiest consumers start lingering at about 20 orders/s
    fetch_linger_above_per_s: float = Field(150.0, ge=0)
    fetch_linger_min_bytes: int = Field(16384, ge=1)
    #: 0: never linger; well below aiokafka's request timeout (40 s), which a fetch
    #: held longer would run into
    fetch_linger_ms: int = Field(100, ge=0, le=5000)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Only bookkeeping here, no locks (aiokafka documents a deadlock, and it may hand
    out records before this listener returns): the processing loop checks every batch
    against the position stored in the database instead. One await: the Kafka commit of
    the revoked partitions' offsets not committed yet, as aiokafka's own auto-commit
    does before a rebalance, so the next owner's lag tooling starts from them."""

    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # A batch still in flight for a revoked partition may commit after the new owner
        # started: the inbox dedupes and positions only move forward (GREATEST). Its
        # retries and dead letter stop at the next check (``owns``).
        for tp in revoked:
            self.runtime.positions.revoked(tp)
            self.runtime.revocations[tp] = self.runtime.revocations.get(tp, 0) + 1
        await self.runtime.commit_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self.runtime.positions.forget(tp)  # reload from the database
        log.info(
            "%s assigned %s",
            self.runtime.group,
            sorted(f"{t.topic}/{t.partition}" for t in assigned),
        )


class ConsumerRuntime:
    """One member of a consumer group: polls its partitions and hands each partition's
    batch to ``batches`` (``BatchProcessor``) once ``positions`` placed it."""

    def __init__(
        self,
        *,
        service: str,
        group: str,
        routes: Sequence[Route],
        engine: AsyncEngine,
        bootstrap: str,
        producer: dlq.DeadLetterProducer,
        metrics: RuntimeMetrics,
        settings: RuntimeSettings,
        on_dead_letter: DeadLetterHook | None = None,
        client_id: str | None = None,
        inbox_retention: timedelta = timedelta(days=7),
        lanes: int = 1,
        prepare_batch: BatchHook | None = None,
    ) -> None:
        self.service, self.group = service, group
        #: partition batches of one poll applied side by side (``lanes_of``)
        self.lanes = lanes
        self.engine, self.bootstrap = engine, bootstrap
        self.metrics, self.settings = metrics, settings
        self.client_id = client_id or f"paysaga-{service}"
        self.inbox = Inbox(group, routes, settings.handler_timeout_s)
        self.blocking = KeyBlocking(
            group=group,
            service=service,
            inbox=self.inbox,
            producer=producer,
            metrics=metrics,
            on_dead_letter=on_dead_letter,
        )
        self.positions = Positions(
            group=group,
            service=service,
            engine=engine,
            metrics=metrics,
            inbox_retention=inbox_retention,
            member=self,
        )
        self.batches = BatchProcessor(
            group=group,
            service=service,
            engine=engine,
            inbox=self.inbox,
            blocking=self.blocking,
            producer=producer,
            metrics=metrics,
            retry_budget_s=settings.retry_budget_s,
            member=self,
            prepare=prepare_batch,
        )
        #: revocations seen per partition: records fetched under an earlier count are
        #: no longer this member's to retry or dead-letter
        self.revocations: dict[TopicPartition, int] = {}
        self.last_progress = 0.0
        #: next offsets stored in the database, not committed to Kafka yet (``_commit_kafka``)
        self.uncommitted: dict[TopicPartition, int] = {}
        self._committed_at = -math.inf
        self._consumer: AIOKafkaConsumer | None = None
        self._rng = random.Random()
        s = settings
        self.linger = Linger(
            quiet=FetchWait(s.fetch_min_bytes, s.fetch_max_wait_ms),
            busy=FetchWait(s.fetch_linger_min_bytes, s.fetch_linger_ms),
            above_per_s=s.fetch_linger_above_per_s if s.fetch_linger_ms > 0 else 0.0,
        )

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        return self._consumer

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then finish the in-flight batch and leave the group."""
        s = self.settings
        consumer = AIOKafkaConsumer(
            **client_options(self.bootstrap),
            group_id=self.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_interval_ms=s.max_poll_interval_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_records=s.max_batch,
            fetch_min_bytes=s.fetch_min_bytes,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            # saga topics are co-partitioned by order id: the range assignor gives one
            # member partition N of every topic, so one order's events meet in one process
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        self._consumer = consumer
        topics = [*self.inbox.routes, self.blocking.control_topic]
        consumer.subscribe(topics, listener=_Listener(self))
        await consumer.start()
        can_set = settable(consumer)
        if self.linger.above_per_s > 0 and not can_set:
            log.error(
                "%s: this aiokafka's fetch wait cannot be set: fetches never linger", self.group
            )
        self.linger.reset(enabled=can_set)
        try:
            async with self.batches.kept.while_running():
                await self._consume(consumer, stop)
        finally:
            await self._store_skipped(now=True)
            await self._commit_kafka(now=True)
            await consumer.stop()  # commits nothing (auto-commit off) and leaves the group
            self._consumer = None

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        s = self.settings
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=s.poll_timeout_ms)
            wait = self.linger.polled(time.monotonic(), sum(map(len, batch.values())))
            if wait is not None:
                apply(consumer, wait)
                log.debug("%s fetches now wait for %s", self.group, wait)
            fetched = {tp: self.revocations.get(tp, 0) for tp in batch}
            placed: list[tuple[TopicPartition, list[Record]]] = []
            for tp, messages in batch.items():
                records = [Record.from_kafka(m) for m in messages]
                records = await self.positions.in_position(tp, records)
                if records and not self._skip(tp, records):
                    placed.append((tp, records))
            await self._process_lanes(lanes_of(placed, self.lanes), fetched)
            await self._store_skipped()
            await self._commit_kafka()
            await self._update_lag()

    def _skip(self, tp: TopicPartition, records: list[Record]) -> bool:
        """Take a batch of records that the group ignores, every one (``Inbox.ignores``),
        without a transaction: applying it would change nothing but the stored position,
        which follows within ``skipped_position_every_s`` (``Positions.skip``). Only
        where the group has a stored position already: a partition without one must get
        it at once, or a restart would take Kafka's committed offset for lost positions."""
        if not isinstance(self.positions.expected.get(tp), int):
            return False
        if tp.topic == self.blocking.control_topic or not all(map(self.inbox.ignores, records)):
            return False
        self.positions.skip(tp, records[-1].offset + 1)
        self.metrics.records.labels(self.service, tp.topic, "skipped").inc(len(records))
        self._progress()
        return True

    async def _store_skipped(self, *, now: bool = False) -> None:
        """The positions past skipped batches stored (``Positions.store_skipped``), to be
        committed to Kafka with the others (``_commit_kafka``)."""
        every = 0.0 if now else self.settings.skipped_position_every_s
        self.uncommitted.update(await self.positions.store_skipped(every))

    async def _process_lanes(
        self,
        lanes: list[list[tuple[TopicPartition, list[Record]]]],
        fetched: dict[TopicPartition, int],
    ) -> None:
        """Apply the lanes side by side, each lane's partition batches in one
        transaction on its own connection (``BatchProcessor.process_lane``); the
        partitions that moved are committed to Kafka later (``_commit_kafka``)."""

        async def lane(work: list[tuple[TopicPartition, list[Record]]]) -> None:
            started = time.perf_counter()
            applied = await self.batches.process_lane(work, fetched)
            for tp, records in work:
                if not applied[tp]:
                    continue  # revoked meanwhile: the new owner goes on from the stored position
                moved[tp] = nxt = records[-1].offset + 1
                self.positions.expected[tp] = nxt
                self._progress()
                fault_point("after_db_commit_before_kafka_commit")
                self.metrics.processing_seconds.labels(self.service).observe(
                    time.perf_counter() - started
                )

        moved: dict[TopicPartition, int] = {}
        outcomes = await asyncio.gather(*(lane(w) for w in lanes), return_exceptions=True)
        self.positions.saved(moved)
        self.uncommitted.update(moved)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def _progress(self) -> None:
        """A stored position advanced, or nothing is waiting: polling alone (empty polls,
        the polls of a retry backoff) is not progress."""
        self.last_progress = time.time()
        self.metrics.last_progress.labels(self.service).set(self.last_progress)

    def ready(self) -> bool:
        """False once records waited ``stall_after_s`` without a position advancing: a
        partition stuck on one record, an endless retry, a consumer silently stuck after
        a broker restart (aiokafka#1154)."""
        return time.time() - self.last_progress < self.settings.stall_after_s

    def position_problems(self) -> list[str]:
        """What makes positions not ready (``/readyz``)."""
        return self.positions.problems()

    # ------------------------------------------------------------------ membership

    def owns(self, tp: TopicPartition, fetched: int) -> bool:
        """Whether ``tp`` is still this member's as when its records were fetched (with
        ``fetched`` revocations seen): not revoked since, not even to be handed back."""
        consumer = self._consumer
        assigned = consumer is None or tp in consumer.assignment()
        return assigned and self.revocations.get(tp, 0) == fetched

    async def until_done(
        self, step: Callable[[], Awaitable[T]], what: str = "dead-letter step"
    ) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await step()
            except Exception as exc:
                self.metrics.retries.labels(self.service, type(exc).__name__).inc()
                log.warning("%s retrying %s: %s", self.group, what, said(exc))
                await self.backoff(attempt)

    async def backoff(self, attempt: int) -> None:
        """Exponential backoff with full jitter. Partitions are paused and the consumer
        keeps polling meanwhile, so the group sees a live member."""
        s = self.settings
        delay = backoff_s(attempt, s.retry_base_s, s.retry_max_s, self._rng.random(), fixed=0)
        consumer = self._consumer
        if consumer is None:
            await asyncio.sleep(delay)
            return
        try:
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0:
                # re-paused every round: a rebalance meanwhile brings unpaused partitions
                consumer.pause(*consumer.assignment())
                returned = await consumer.getmany(timeout_ms=max(1, int(left * 1000)))
                # this poll only keeps the membership alive: whatever it returned anyway
                # is un-read, or — if it was a partition's last records — never processed
                for tp, messages in returned.items():
                    if messages:
                        consumer.seek(tp, messages[0].offset)
        finally:
            consumer.resume(*consumer.assignment())

    async def _commit_kafka(self, *, now: bool = False) -> None:
        """The stored positions not committed to Kafka yet, in one commit, once
        ``commit_every_s`` passed since the last one (or ``now``). The latest per
        partition: positions only move forward, but for a reset (``Positions``)."""
        if not self.uncommitted:
            return
        if not now and time.monotonic() - self._committed_at < self.settings.commit_every_s:
            return
        offsets, self.uncommitted = self.uncommitted, {}
        self._committed_at = time.monotonic()
        await self._commit(offsets)

    async def commit_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit the revoked partitions' offsets not committed yet, before they go."""
        offsets = {tp: self.uncommitted.pop(tp) for tp in revoked if tp in self.uncommitted}
        await self._commit(offsets)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """One commit for the partitions that are still this member's; the others are
        dropped (their new owner commits its own)."""
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        offsets = {tp: nxt for tp, nxt in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except Exception as exc:  # informational only: the database holds the position
            log.info("%s kafka commit of %s deferred: %s", self.group, sorted(offsets), said(exc))
            for tp, nxt in offsets.items():  # tried again with the next commit, unless moved on
                self.uncommitted.setdefault(tp, nxt)

    async def _update_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        lag: dict[str, int] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            position = await consumer.position(tp)
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - position)
        for topic, value in lag.items():
            self.metrics.consumer_lag.labels(self.service, topic).set(value)
        await self.positions.check_caught_up(consumer)
        if not any(lag.values()):
            self._progress()


def lanes_of(
    batches: Sequence[tuple[TopicPartition, list[Record]]], lanes: int
) -> list[list[tuple[TopicPartition, list[Record]]]]:
    """The partition batches of one poll, in lanes applied side by side: partition
    number N of every topic goes to lane N mod ``lanes``. Saga topics are co-partitioned
    by order id, so one order's records all travel in one lane, in the order fetched:
    two lanes never wait on (or deadlock over) one order's locks. One lane: one after
    another, as fetched."""
    out: dict[int, list[tuple[TopicPartition, list[Record]]]] = {}
    for tp, records in batches:
        out.setdefault(tp.partition % max(1, lanes), []).append((tp, records))
    return list(out.values())
