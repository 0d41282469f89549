"""The consumer loop: DESIGN.md's processing rule over aiokafka.

Guarantees:

* Every record is handled inside one transaction of the service's database that also
  writes its inbox row (dedupe), its outbox rows (emitted events) and the consumer
  position. State, emitted events and position commit together or not at all; the
  Kafka offset commit afterwards is informational (lag tooling).
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
  group are parked (stored, not processed) until a replay of the dead letter succeeds
  or an operator purges it (``paysaga dlq``): replay never applies events out of order.
  Released parked records are applied in order; one that fails permanently then
  becomes the key's dead letter and blocks the rest. A replay or purge acts only while
  the dead letter it names is open, so repeating one is harmless.
* A position that does not fit the log is never taken silently. A stored position
  beyond the log end (a recreated topic) is reset to the log start — the records below
  it are new to the group, and the inbox absorbs any it applied; records older than the
  inbox retention, which it could not absorb, are not re-read — with an error line, a
  metric and ``/readyz`` red until the partition caught up; a partition without a
  stored position logs where it starts (``_no_stored_position``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import dlq
from services.runtime.errors import PermanentError, describe, is_transient, said
from services.runtime.faults import fault_point
from services.runtime.locks import xact_lock
from services.runtime.messages import Context, Handler, Record, Route
from services.runtime.metrics import RuntimeMetrics
from services.runtime.retry import backoff_s
from services.runtime.tables import consumer_positions, dead_letters, inbox, parked
from services.runtime.topics import load_specs

log = logging.getLogger("paysaga.consumer")
T = TypeVar("T")

#: clock skew between record timestamps and the inbox's ``received_at``, and prune timing
_INBOX_MARGIN = timedelta(hours=1)

#: the outcome of a record whose partition was revoked while it was retried
REVOKED = "revoked"

#: Called in the dead-letter transaction, so a service can flag what the record was
#: about (payments flags the order for reconciliation).
DeadLetterHook = Callable[[AsyncConnection, Record, BaseException], Awaitable[None]]


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    max_batch: int = 500
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


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Only bookkeeping here: no locks and no awaits (aiokafka documents a deadlock, and
    it may hand out records before this listener returns). The processing loop checks
    every batch against the position stored in the database instead."""

    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # A batch still in flight for a revoked partition may commit after the new owner
        # started: the inbox dedupes and positions only move forward (GREATEST). Its
        # retries and dead letter stop at the next check (``_owns``).
        for tp in revoked:
            self.runtime.expected.pop(tp, None)
            self.runtime.revocations[tp] = self.runtime.revocations.get(tp, 0) + 1
            self.runtime.position_alarms.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self.runtime.expected.pop(tp, None)  # reload from the database
        log.info(
            "%s assigned %s",
            self.runtime.group,
            sorted(f"{t.topic}/{t.partition}" for t in assigned),
        )


class ConsumerRuntime:
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
    ) -> None:
        self.service, self.group = service, group
        self.routes = {r.topic: r for r in routes}
        self.engine, self.bootstrap = engine, bootstrap
        self.producer, self.metrics, self.settings = producer, metrics, settings
        self.on_dead_letter = on_dead_letter
        #: how long the inbox remembers an applied record (the relay prunes it after)
        self.inbox_retention = inbox_retention
        self.client_id = client_id or f"paysaga-{service}"
        #: the group's dead-letter topic is also its control channel: replays and
        #: releases (purges) arrive there, never on a topic that others read
        self.control_topic = dlq.dlq_topic(group)
        #: next offset to process per partition, from the database; absent = not loaded
        self.expected: dict[TopicPartition, int | None] = {}
        #: revocations seen per partition: records fetched under an earlier count are
        #: no longer this member's to retry or dead-letter
        self.revocations: dict[TopicPartition, int] = {}
        #: partitions re-reading what a stored position beyond the log end hid: the log
        #: end they had then, and what ``/readyz`` says about them until they reach it
        self.position_alarms: dict[TopicPartition, tuple[int, str]] = {}
        self.last_progress = 0.0
        self._consumer: AIOKafkaConsumer | None = None
        self._rng = random.Random()

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; then finish the in-flight batch and leave the group."""
        s = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_interval_ms=s.max_poll_interval_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_records=s.max_batch,
            # saga topics are co-partitioned by order id: the range assignor gives one
            # member partition N of every topic, so one order's events meet in one process
            partition_assignment_strategy=(RangePartitionAssignor,),
        )
        self._consumer = consumer
        consumer.subscribe([*self.routes, self.control_topic], listener=_Listener(self))
        await consumer.start()
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=s.poll_timeout_ms)
                fetched = {tp: self.revocations.get(tp, 0) for tp in batch}
                for tp, messages in batch.items():
                    records = await self._in_position(tp, [_record(m) for m in messages])
                    if records:
                        await self._process_partition(tp, records, fetched[tp])
                await self._update_lag()
        finally:
            await consumer.stop()  # commits nothing (auto-commit off) and leaves the group
            self._consumer = None

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
        """What makes positions not ready (``/readyz``): partitions whose stored position
        was beyond the log end, until they caught up with it (``_beyond_log_end``)."""
        return sorted(reason for _, reason in self.position_alarms.values())

    async def _in_position(self, tp: TopicPartition, records: list[Record]) -> list[Record]:
        """The records of a batch that continue from the stored position. Records below
        it were processed already. Right after (re)loading the position, a batch starting
        above it (the consumer was placed elsewhere, e.g. by its Kafka-committed offset)
        is dropped and the partition sought to the stored position — once: offsets
        missing from a log are normal (compacted away, a transaction marker, retention),
        so whatever Kafka returns from there on is taken as the continuation. A batch all
        below the position may mean the position is beyond the log end: checked."""
        consumer = self._consumer
        assert consumer is not None
        if tp not in self.expected:
            stored = self.expected[tp] = await self._stored_position(tp)
            if stored is None:
                await self._no_stored_position(tp, records)
            elif records and records[0].offset > stored:
                log.info("%s re-positioning %s to stored offset %d", self.group, tp, stored)
                consumer.seek(tp, stored)
                return []
        expected = self.expected[tp]
        if expected is None:
            return records  # never processed by this group: from where aiokafka placed it
        kept = [r for r in records if r.offset >= expected]
        if records and not kept and await self._beyond_log_end(tp, expected):
            return []
        if kept and kept[0].offset > expected:
            await self._gap(tp, expected, kept[0].offset)
        return kept

    async def _no_stored_position(self, tp: TopicPartition, records: list[Record]) -> None:
        """Say where a partition without a stored position starts. aiokafka placed it at
        the group's committed offset in Kafka, else at the log start (a partition new to
        the group). A committed offset without a stored position means this database
        lost positions that Kafka remembers (recreated, or restored without them): the
        records below that offset are not read — a warning, counted."""
        consumer = self._consumer
        assert consumer is not None
        at = records[0].offset if records else "?"
        where = f"{self.group} {tp.topic}/{tp.partition}: no stored position"
        try:
            committed = await consumer.committed(tp)
        except KafkaError as exc:
            log.warning("%s, consuming from offset %s (committed offset: %s)", where, at, said(exc))
            return
        if committed is None:
            log.info(
                "%s and no committed offset: a partition new to this group, consumed from"
                " the log start (offset %s)",
                where,
                at,
            )
            return
        self.metrics.position_anomalies.labels(self.service, tp.topic, "no_stored_position").inc()
        log.warning(
            "%s, but the group's committed offset in Kafka is %d: consuming from there"
            " (offset %s); records below it are not read. Was the database recreated or"
            " restored without its consumer_positions? (README: Design, positions)",
            where,
            committed,
            at,
        )

    async def _beyond_log_end(self, tp: TopicPartition, expected: int) -> bool:
        """Whether the stored position is beyond the log end — then reset to the log start.

        A recreated topic (or a broker that lost records) starts its offsets anew below
        the position: every record of it would be dropped as "processed", one by one,
        silently and forever — lost payments. Reading them is safe: the inbox absorbs
        any this group applied (it keys by event id, and by business key for gateway
        confirmations) — but only for ``inbox_retention``: records older than that are
        not re-read (a log that lost only its newest records holds old records applied
        long ago, their inbox rows pruned: read again, they would be applied twice).
        Halting the partition for an operator would not be: once the log
        end passes the old position, a restarted consumer can no longer tell, and skips
        the records below it. So the position is reset at once, durably, and said loudly:
        an error line, ``paysaga_consumer_position_anomalies_total{kind="beyond_log_end"}``,
        ``/readyz`` red until the partition has caught up with the log end it had."""
        consumer = self._consumer
        assert consumer is not None
        end = (await consumer.end_offsets([tp]))[tp]
        if expected <= end:
            return False  # records already processed, read again (after a rebalance, say)
        start = (await consumer.beginning_offsets([tp]))[tp]
        # The inbox tells applied records apart only for ``inbox_retention``: an older
        # record (its inbox row pruned) may have been applied — a log that lost only its
        # newest records (an unclean leader election) — and would be applied again.
        horizon = time.time() - (self.inbox_retention - _INBOX_MARGIN).total_seconds()
        found = (await consumer.offsets_for_times({tp: int(horizon * 1000)}))[tp]
        nxt = max(start, found.offset) if found is not None else end
        if nxt == start:
            where = f"consuming from the log start {start}"
        else:
            where = (
                f"consuming from offset {nxt}: offsets {start}..{nxt - 1} are older than the"
                f" inbox retention ({self.inbox_retention}) and are not re-read, since the"
                " inbox can no longer tell whether this group applied them (a second apply"
                " may move money twice); check them by hand if the topic was recreated"
            )
        log.error(
            "%s %s/%d: stored position %d is beyond the log end %d: the topic was recreated"
            " or the broker lost records, and the records below %d may be new to this"
            " group. Resetting the position: %s (the inbox skips any record this group"
            " applied already)",
            self.group,
            tp.topic,
            tp.partition,
            expected,
            end,
            expected,
            where,
        )
        await self._until_done(lambda: self._reset_position(tp, nxt), "position reset")
        self.metrics.position_anomalies.labels(self.service, tp.topic, "beyond_log_end").inc()
        self.position_alarms[tp] = (
            end,
            f"{tp.topic}/{tp.partition}: stored position {expected} was beyond the log end"
            f" {end} (a recreated topic?); re-reading it from offset {nxt} (log start {start})",
        )
        consumer.seek(tp, nxt)
        self.expected[tp] = nxt
        return True

    async def _reset_position(self, tp: TopicPartition, nxt: int) -> None:
        """Set the stored position back (``_save_position`` only moves it forward)."""
        async with self._transaction() as conn:
            await conn.execute(
                update(consumer_positions)
                .where(
                    consumer_positions.c.consumer_group == self.group,
                    consumer_positions.c.topic == tp.topic,
                    consumer_positions.c.partition == tp.partition,
                )
                .values(next_offset=nxt, updated_at=datetime.now(UTC))
            )

    async def _gap(self, tp: TopicPartition, expected: int, got: int) -> None:
        """Offsets ``expected..got-1`` do not exist. Compaction and transaction markers
        make such gaps; a stored position below the log start means records expired
        (retention) before this group processed them — said loudly."""
        consumer = self._consumer
        assert consumer is not None
        start = (await consumer.beginning_offsets([tp]))[tp]
        if expected < start:
            self.metrics.records.labels(self.service, tp.topic, "lost_to_retention").inc(
                start - expected
            )
            log.error(
                "%s %s: stored position %d is below the log start %d: %d record(s) expired"
                " before this group processed them; continuing from %d",
                self.group,
                tp,
                expected,
                start,
                start - expected,
                got,
            )
        else:
            log.debug(
                "%s %s: offsets %d..%d absent (compaction/markers)",
                self.group,
                tp,
                expected,
                got - 1,
            )

    async def _stored_position(self, tp: TopicPartition) -> int | None:
        """The partition's position stored in the database, retried with backoff while
        the database is unavailable: an assignment (a member joining or leaving) during
        an outage must wait for the database, not kill the consumer."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.engine.connect() as conn:
                    stored: int | None = (
                        await conn.execute(
                            select(consumer_positions.c.next_offset).where(
                                consumer_positions.c.consumer_group == self.group,
                                consumer_positions.c.topic == tp.topic,
                                consumer_positions.c.partition == tp.partition,
                            )
                        )
                    ).scalar()
                return stored
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.metrics.retries.labels(self.service, type(exc).__name__).inc()
                log.info(
                    "%s loading the position of %s failed (%s): retrying",
                    self.group,
                    tp,
                    said(exc),
                )
                await self._backoff(attempt)

    # ------------------------------------------------------------------ processing

    def _owns(self, tp: TopicPartition, fetched: int) -> bool:
        """Whether ``tp`` is still this member's as when its records were fetched (with
        ``fetched`` revocations seen): not revoked since, not even to be handed back."""
        consumer = self._consumer
        assigned = consumer is None or tp in consumer.assignment()
        return assigned and self.revocations.get(tp, 0) == fetched

    def _left_to_new_owner(self, tp: TopicPartition, rec: Record) -> str:
        log.info(
            "%s %s/%d was revoked while %d was retried: the record is left to its new owner",
            self.group,
            tp.topic,
            tp.partition,
            rec.offset,
        )
        return REVOKED

    async def _process_partition(
        self, tp: TopicPartition, records: list[Record], fetched: int
    ) -> None:
        started = time.perf_counter()
        self.metrics.batch_size.labels(self.service).observe(len(records))
        outcomes: list[tuple[str, str]] = []
        try:
            async with self._transaction() as conn:
                # one query for the batch instead of one per record; _apply keeps the set
                # current when a replay or purge in the batch changes a key's state
                blocked = await self._blocked_keys(conn, {_order_key(r) for r in records})
                for rec in records:
                    outcomes.append((rec.topic, await self._apply(conn, rec, blocked)))
                await self._save_position(conn, tp, records[-1].offset + 1)
        except Exception as exc:
            if len(records) > 1 or not isinstance(exc, PermanentError):
                log.info(
                    "%s batch of %d failed (%s): one at a time",
                    self.group,
                    len(records),
                    said(exc),
                )
            outcomes = []
            for rec in records:
                outcomes.append((rec.topic, await self._process_one(tp, rec, fetched)))
                if outcomes[-1][1] == REVOKED:
                    break  # this record and the rest of the batch are the new owner's
        for topic, outcome in outcomes:
            self.metrics.records.labels(self.service, topic, outcome).inc()
        if outcomes[-1][1] == REVOKED:
            return
        self.expected[tp] = records[-1].offset + 1
        self._progress()
        fault_point("after_db_commit_before_kafka_commit")
        self.metrics.processing_seconds.labels(self.service).observe(time.perf_counter() - started)
        await self._commit_kafka(tp, records[-1].offset + 1)

    async def _process_one(self, tp: TopicPartition, rec: Record, fetched: int) -> str:
        attempt, first_failure, started = 0, datetime.now(UTC), time.monotonic()
        while True:
            attempt += 1
            if attempt > 1 and not self._owns(tp, fetched):
                return self._left_to_new_owner(tp, rec)
            # once the budget is spent, a release dead-letters a parked record that still
            # fails transiently instead of failing as a whole
            final = time.monotonic() - started >= self.settings.retry_budget_s
            try:
                async with self._transaction() as conn:
                    outcome = await self._apply(conn, rec, final=final)
                    await self._save_position(conn, tp, rec.offset + 1)
                return outcome
            except Exception as exc:
                if attempt == 1:
                    first_failure = datetime.now(UTC)
                spent = time.monotonic() - started
                if rec.topic == self.control_topic:  # retried, never dead-lettered
                    if not is_transient(exc) or final:
                        if not self._owns(tp, fetched):  # the new owner completes it
                            return self._left_to_new_owner(tp, rec)
                        return await self._abandon_control(tp, rec, exc)
                    self.metrics.retries.labels(self.service, type(exc).__name__).inc()
                    await self._backoff(attempt)
                    continue
                if not is_transient(exc) or spent >= self.settings.retry_budget_s:
                    outcome = await self._dead_letter(tp, rec, exc, attempt, first_failure, fetched)
                    if outcome == REVOKED:
                        return self._left_to_new_owner(tp, rec)
                    return outcome
                self.metrics.retries.labels(self.service, type(exc).__name__).inc()
                await self._backoff(attempt)

    async def _abandon_control(self, tp: TopicPartition, rec: Record, exc: Exception) -> str:
        """A replay or release that cannot complete (the replayed record fails again, or
        the database stayed unavailable past the budget) is never dead-lettered: its dead
        letter stays open and the key blocked, and the operator repeats it later."""
        log.error(
            "%s replay/release %s/%d@%d not completed, its dead letter stays open: %s",
            self.group,
            rec.topic,
            rec.partition,
            rec.offset,
            said(exc),
        )

        async def move_on() -> None:
            async with self._transaction() as conn:
                await self._save_position(conn, tp, rec.offset + 1)

        await self._until_done(move_on)
        return "control_failed"

    async def _apply(
        self,
        conn: AsyncConnection,
        rec: Record,
        blocked: set[str] | None = None,
        final: bool = False,
    ) -> str:
        """Handle one record inside ``conn``'s transaction; returns the outcome label.

        Control headers (replay, release, target group) count only on a record read from
        the group's own dead-letter topic, which only paysaga writes: on every other
        topic — inputs that others produce to above all — a ``paysaga-`` header carries
        no authority, and the record is processed like any other (CONTRACT §1)."""
        control = rec.topic == self.control_topic
        if control:
            view = dlq.control_view(rec)
            if view is None:
                return "skipped"  # a dead letter itself: for the operator, not for us
            if rec.header(dlq.H_TARGET_GROUP) != self.group.encode():
                return "skipped"  # a replay or release meant for another consumer group
            rec = view
        order_key = _order_key(rec)
        release = control and rec.header(dlq.H_CONTROL) == dlq.CONTROL_RELEASE
        replay = control and rec.header(dlq.H_REPLAY_OF) is not None
        if release or replay:
            named = await self._named_dead_letter(conn, rec)
            if named is None:
                # its dead letter was resolved already (a repeated replay or purge, or a
                # replay of a purged record): acting again would unblock the key past a
                # record that failed since, or apply an event after its successors
                return "skipped"
            order_key = named
        if release:
            await self._release(conn, order_key, "purged", final)
            await self._refresh_blocked(conn, order_key, blocked)
            return "released"
        if not replay and (blocked is None or order_key in blocked):
            parked_as = await self._park(conn, order_key, rec, blocked)
            if parked_as is not None:
                return parked_as
        outcome = await self._handle(conn, rec)
        if replay:
            await self._release(conn, order_key, "replayed", final)
            await self._refresh_blocked(conn, order_key, blocked)
        return outcome

    async def _park(
        self, conn: AsyncConnection, order_key: str, rec: Record, blocked: set[str] | None
    ) -> str | None:
        """Park ``rec`` if its key is blocked; None (apply it) if it is not. Under the
        key's lock: a release on another member either sees this parked row or has
        already freed the key (then this record is applied, after the released ones)."""
        await self._lock_key(conn, order_key)
        if not await self._blocked(conn, order_key):
            if blocked is not None:
                blocked.discard(order_key)
            return None
        if await self._is_dead_letter(conn, rec):
            return "duplicate"  # the failed record itself, read again (a rebalance)
        # stored without card data (released, a redacted record is rejected anyway)
        value, _ = dlq.redacted_value(rec.value)
        await conn.execute(
            insert(parked).values(
                consumer_group=self.group,
                order_key=order_key,
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                key=rec.key,
                value=value,
                headers=[
                    [k, v.decode("utf-8", "replace")] for k, v in dlq.redacted_headers(rec.headers)
                ],
                timestamp_ms=rec.timestamp_ms,
            )
        )
        return "parked"

    def _route(self, rec: Record) -> tuple[Handler | None, str, dict[str, Any] | None]:
        """(handler — None for an event type this group ignores, inbox key, envelope)."""
        route = self.routes.get(rec.topic)
        if route is None:
            raise PermanentError("unrouted_topic", rec.topic)
        if route.raw_handler is not None:
            assert route.dedupe_key is not None
            return route.raw_handler, route.dedupe_key(rec), None
        envelope = parse_envelope(rec.value)
        return route.handlers.get(str(envelope["event_type"])), str(envelope["event_id"]), envelope

    def _dedupe_key(self, rec: Record) -> str | None:
        """The inbox key of a record, None if it has none (it is not even an envelope)."""
        try:
            return self._route(rec)[1]
        except Exception:
            return None

    async def _handle(self, conn: AsyncConnection, rec: Record) -> str:
        handler, dedupe, envelope = self._route(rec)
        if handler is None:
            return "skipped"
        inserted = await conn.execute(
            pg_insert(inbox)
            .values(consumer_group=self.group, dedupe_key=dedupe)
            .on_conflict_do_nothing()
            .returning(inbox.c.dedupe_key)
        )
        if inserted.first() is None:
            return "duplicate"
        ctx = Context(conn=conn, record=rec, envelope=envelope, now=datetime.now(UTC))
        # bounded: a handler slower than max_poll_interval would cost the partition
        await asyncio.wait_for(handler(ctx), self.settings.handler_timeout_s)
        fault_point("inside_db_transaction")
        return "processed"

    async def _blocked(self, conn: AsyncConnection, order_key: str) -> bool:
        row = await conn.execute(
            select(dead_letters.c.id)
            .where(
                and_(
                    dead_letters.c.consumer_group == self.group,
                    dead_letters.c.order_key == order_key,
                    dead_letters.c.resolved_at.is_(None),
                )
            )
            .limit(1)
        )
        return row.first() is not None

    async def _lock_key(self, conn: AsyncConnection, order_key: str) -> None:
        """Serialize parking and releasing of one key across members (until commit)."""
        await xact_lock(conn, f"{self.group}|{order_key}")

    async def _is_dead_letter(self, conn: AsyncConnection, rec: Record) -> bool:
        row = await conn.execute(
            select(dead_letters.c.id)
            .where(
                dead_letters.c.consumer_group == self.group,
                dead_letters.c.topic == rec.topic,
                dead_letters.c.partition == rec.partition,
                dead_letters.c.offset == rec.offset,
            )
            .limit(1)
        )
        return row.first() is not None

    async def _refresh_blocked(
        self, conn: AsyncConnection, order_key: str, blocked: set[str] | None
    ) -> None:
        """After a release: the key is free — unless a parked record failed and blocks it."""
        if blocked is not None:
            blocked.discard(order_key)
            if await self._blocked(conn, order_key):
                blocked.add(order_key)

    async def _blocked_keys(self, conn: AsyncConnection, keys: set[str]) -> set[str]:
        rows = await conn.execute(
            select(dead_letters.c.order_key)
            .where(
                dead_letters.c.consumer_group == self.group,
                dead_letters.c.order_key.in_(keys),
                dead_letters.c.resolved_at.is_(None),
            )
            .distinct()
        )
        return set(rows.scalars())

    async def _named_dead_letter(self, conn: AsyncConnection, rec: Record) -> str | None:
        """The order key of the open dead letter a replay or release names, or None when
        that dead letter is no longer open."""
        named = rec.header(dlq.H_DEAD_LETTER)
        if named is None:
            return None
        topic, partition, offset = dlq.failed_record(named)
        row = await conn.execute(
            select(dead_letters.c.order_key)
            .where(
                and_(
                    dead_letters.c.consumer_group == self.group,
                    dead_letters.c.topic == topic,
                    dead_letters.c.partition == partition,
                    dead_letters.c.offset == offset,
                    dead_letters.c.resolved_at.is_(None),
                )
            )
            .limit(1)
        )
        found: str | None = row.scalar()
        return found

    async def _release(
        self, conn: AsyncConnection, order_key: str, resolution: str, final: bool = False
    ) -> None:
        """Resolve the key's open dead letters, then apply its parked records in order,
        in this same transaction. The resolved records' inbox keys are entered, so a
        purged record's other copies (a relay re-publishing it, say) are duplicates from
        now on. A parked record that fails permanently — or, once ``final``, transiently —
        becomes the key's dead letter in turn and the records behind it stay parked: a
        release never skips a record, and never fails the replay or purge behind it."""
        await self._lock_key(conn, order_key)
        resolved = await conn.execute(
            update(dead_letters)
            .where(
                and_(
                    dead_letters.c.consumer_group == self.group,
                    dead_letters.c.order_key == order_key,
                    dead_letters.c.resolved_at.is_(None),
                )
            )
            .values(resolved_at=datetime.now(UTC), resolution=resolution)
            .returning(dead_letters.c.dedupe_key)
        )
        keys = {k for k in resolved.scalars() if k is not None}
        if keys:
            await conn.execute(
                pg_insert(inbox)
                .values([{"consumer_group": self.group, "dedupe_key": k} for k in sorted(keys)])
                .on_conflict_do_nothing()
            )
        if await self._blocked(conn, order_key):
            # the same release ran concurrently (two members around a rebalance), got
            # here first and stopped at a new poison record, which now blocks the key
            return
        rows = (
            await conn.execute(
                select(parked)
                .where(and_(parked.c.consumer_group == self.group, parked.c.order_key == order_key))
                .order_by(parked.c.id)
                .with_for_update()
            )
        ).all()
        done: list[int] = []
        for row in rows:
            rec = Record(
                topic=row.topic,
                partition=row.partition,
                offset=row.offset,
                key=row.key,
                value=row.value,
                headers=tuple((k, v.encode()) for k, v in row.headers),
                timestamp_ms=row.timestamp_ms,
            )
            try:
                async with conn.begin_nested():  # a failure undoes this record only
                    await self._handle(conn, rec)
            except Exception as exc:
                if is_transient(exc) and not final:
                    raise  # the whole release is retried with backoff
                await self._dead_letter_parked(conn, rec, exc)
                done.append(row.id)
                break
            done.append(row.id)
        if done:
            await conn.execute(delete(parked).where(parked.c.id.in_(done)))

    async def _dead_letter_parked(self, conn: AsyncConnection, rec: Record, exc: Exception) -> None:
        """Dead-letter a parked record inside the release's transaction. Published first
        (acks=all): should the transaction then fail, the release is retried and the dead
        letter may be published twice — never lost."""
        log.warning(
            "%s dead-lettering parked %s/%d@%d: %s",
            self.group,
            rec.topic,
            rec.partition,
            rec.offset,
            said(exc),
        )
        now = datetime.now(UTC)
        headers = dlq.headers_for(rec, self.group, exc, 1, now)
        await self.producer.send_dead_letter(self.group, rec, headers)
        await self._record_dead_letter(conn, rec, exc, 1, now)
        self.metrics.records.labels(self.service, rec.topic, "dead_lettered").inc()

    async def _dead_letter(
        self,
        tp: TopicPartition,
        rec: Record,
        exc: BaseException,
        attempts: int,
        first: datetime,
        fetched: int,
    ) -> str:
        """Publish to the group's DLQ (acks=all), then — in one transaction — record the
        dead letter (blocking the key), run the service hook and move the position.
        Both steps are retried until they succeed: a dead letter is never dropped.

        Unless the record is no longer this member's to dead-letter — checked before
        publishing (as far as the database answers: it is often why the budget ran out)
        and again in the recording transaction: ``"revoked"`` once the partition was
        revoked (its new owner retries or applies the record), ``"duplicate"`` when the
        record's inbox key is entered (applied meanwhile, by the new owner say)."""
        headers = dlq.headers_for(rec, self.group, exc, attempts, first)

        async def settled(record: bool) -> str | None:
            """Why the record is not to be dead-lettered; else None, and — with
            ``record`` — the dead letter recorded."""
            if not self._owns(tp, fetched):
                return REVOKED
            async with self._transaction() as conn:
                if await self._in_inbox(conn, rec):
                    await self._save_position(conn, tp, rec.offset + 1)
                    return "duplicate"
                if record:
                    await self._record_dead_letter(conn, rec, exc, attempts, first)
                    await self._save_position(conn, tp, rec.offset + 1)
            return None

        async def publish() -> str | None:
            if not self._owns(tp, fetched):
                return REVOKED
            await self.producer.send_dead_letter(self.group, rec, headers)
            return None

        try:
            why = await settled(record=False)
        except Exception as check_failed:
            if not is_transient(check_failed):
                raise
            why = None  # the database is unavailable: asked again when recording
        if why is None:
            log.warning(
                "%s dead-lettering %s/%d@%d: %s",
                self.group,
                rec.topic,
                rec.partition,
                rec.offset,
                said(exc),
            )
            why = await self._until_done(publish) or await self._until_done(
                lambda: settled(record=True)
            )
        if why == "duplicate":
            log.info(
                "%s %s/%d@%d was applied meanwhile (its inbox key is entered): not dead-lettered",
                self.group,
                rec.topic,
                rec.partition,
                rec.offset,
            )
        return why or "dead_lettered"

    async def _in_inbox(self, conn: AsyncConnection, rec: Record) -> bool:
        key = self._dedupe_key(rec)
        if key is None:
            return False
        found = await conn.execute(
            select(inbox.c.dedupe_key).where(
                inbox.c.consumer_group == self.group, inbox.c.dedupe_key == key
            )
        )
        return found.first() is not None

    async def _record_dead_letter(
        self, conn: AsyncConnection, rec: Record, exc: BaseException, attempts: int, first: datetime
    ) -> None:
        """The dead_letters row (it blocks the key) and the service's hook."""
        await conn.execute(
            insert(dead_letters).values(
                consumer_group=self.group,
                order_key=_order_key(rec),
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                error_class=type(exc).__name__,
                error_message=describe(exc)[:2000],
                attempts=attempts,
                first_failure_at=first,
                dedupe_key=self._dedupe_key(rec),
            )
        )
        if self.on_dead_letter is not None:
            await self.on_dead_letter(conn, rec, exc)

    async def _until_done(
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
                await self._backoff(attempt)

    async def _backoff(self, attempt: int) -> None:
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

    async def _save_position(self, conn: AsyncConnection, tp: TopicPartition, nxt: int) -> None:
        stmt = pg_insert(consumer_positions).values(
            consumer_group=self.group, topic=tp.topic, partition=tp.partition, next_offset=nxt
        )
        await conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["consumer_group", "topic", "partition"],
                # positions only move forward, even if a revoked member commits late
                set_={
                    "next_offset": func.greatest(consumer_positions.c.next_offset, nxt),
                    "updated_at": datetime.now(UTC),
                },
            )
        )

    async def _commit_kafka(self, tp: TopicPartition, nxt: int) -> None:
        consumer = self._consumer
        if consumer is None or tp not in consumer.assignment():
            return
        try:
            await consumer.commit({tp: nxt})
        except Exception as exc:  # informational only: the database holds the position
            log.info("%s kafka commit of %s skipped: %s", self.group, tp, said(exc))

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
        for tp, (end, _) in list(self.position_alarms.items()):
            # polled and processed up to the log end the reset position had: caught up
            if tp in consumer.assignment() and await consumer.position(tp) >= end:
                del self.position_alarms[tp]
                log.info(
                    "%s %s/%d: re-read up to %d after the position reset",
                    self.group,
                    tp.topic,
                    tp.partition,
                    end,
                )
        if not any(lag.values()):
            self._progress()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn


@functools.cache
def _own_key_space_topics() -> frozenset[str]:
    """Topics whose record key is not an order id (``catalog.stock.v1``: the SKU).
    Topics topics.yaml does not list keep the record key as it is."""
    return frozenset(spec.name for spec in load_specs() if not spec.keyed_by_order)


def _order_key(rec: Record) -> str:
    # records without a key have no per-order ordering to protect: block only themselves
    if not rec.key_str:
        return f"{rec.topic}/{rec.partition}/{rec.offset}"
    # a SKU "X" that is dead-lettered must not park the records of an order "X"
    return f"{rec.topic}:{rec.key_str}" if rec.topic in _own_key_space_topics() else rec.key_str


def _record(m: Any) -> Record:
    return Record(
        topic=m.topic,
        partition=m.partition,
        offset=m.offset,
        key=m.key,
        value=m.value if m.value is not None else b"",
        headers=tuple((k, bytes(v or b"")) for k, v in (m.headers or ())),
        timestamp_ms=int(m.timestamp),
    )


def parse_envelope(value: bytes) -> dict[str, Any]:
    """Decode and minimally check an envelope; payloads are validated by handlers."""
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PermanentError("invalid_json", str(exc)) from exc
    if not isinstance(doc, dict):
        raise PermanentError("invalid_envelope", "record value is not a JSON object")
    for field in ("event_id", "event_type", "payload"):
        if field not in doc:
            raise PermanentError("invalid_envelope", f"missing field {field!r}")
    if not isinstance(doc["event_id"], str) or not 1 <= len(doc["event_id"]) <= 64:
        raise PermanentError("invalid_envelope", "event_id must be a string of 1..64 chars")
    if not isinstance(doc["payload"], dict):
        raise PermanentError("invalid_envelope", "payload must be an object")
    return doc
