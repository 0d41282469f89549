"""Processing the records of one partition's batch (``consumer.py`` states the
guarantees): the batch in one transaction; if that fails, one record at a time, each
retried within the retry budget and then dead-lettered — only while this member still
owns the partition. A lane's partition batches (``consumer.lanes_of``) are first tried
together in one transaction (``process_lane``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from datetime import UTC, datetime

from aiokafka import TopicPartition
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import deferred, dlq
from services.runtime.blocking import BlockedKeys, KeyBlocking
from services.runtime.errors import PermanentError, is_transient, said
from services.runtime.inbox import Inbox
from services.runtime.kept import KeptConnections
from services.runtime.logs import bound
from services.runtime.member import Member
from services.runtime.messages import BatchHook, Record
from services.runtime.metrics import RuntimeMetrics, track_steps
from services.runtime.positions import save_position, save_positions

log = logging.getLogger("paysaga.consumer")

#: the outcome of a record whose partition was revoked while it was retried
REVOKED = "revoked"


def _written_at(rec: Record) -> int:
    return rec.timestamp_ms


class BatchProcessor:
    """Applies batches for one consumer group; ``retry_budget_s`` bounds how long a
    record failing transiently is retried before it is dead-lettered."""

    def __init__(
        self,
        *,
        group: str,
        service: str,
        engine: AsyncEngine,
        inbox: Inbox,
        blocking: KeyBlocking,
        producer: dlq.DeadLetterProducer,
        metrics: RuntimeMetrics,
        retry_budget_s: float,
        member: Member,
        prepare: BatchHook | None = None,
    ) -> None:
        self.group, self.service, self.engine = group, service, engine
        self.inbox, self.blocking, self.producer = inbox, blocking, producer
        self.metrics, self.retry_budget_s, self.member = metrics, retry_budget_s, member
        self.prepare = prepare
        #: the connections a lane's batches run on, kept from one batch to the next while
        #: the consumer runs (``ConsumerRuntime.run``); the rarer paths (one record at a
        #: time, a dead letter) check theirs out of the engine
        self.kept = KeptConnections(engine)
        #: the one-at-a-time path pauses and polls the consumer while it backs off: one
        #: lane at a time (``consumer.lanes_of``)
        self._one_at_a_time = asyncio.Lock()

    async def process_lane(
        self, work: list[tuple[TopicPartition, list[Record]]], fetched: dict[TopicPartition, int]
    ) -> dict[TopicPartition, bool]:
        """Apply the partition batches of one lane (``consumer.lanes_of``) in one
        transaction — their records, interleaved by the time they were written, then
        every partition's position — and each
        partition's outcome as ``process`` gives it. If that transaction fails, each
        partition's batch goes through ``process`` on its own (its own transaction, then
        one record at a time)."""
        if len(work) > 1:
            try:
                outcomes: list[tuple[str, str]] = []
                async with self.kept.begin() as conn:
                    deferred.defer(conn)
                    steps = track_steps(conn)
                    keys = await self._load(conn, [r for _, rs in work for r in rs])
                    # the partitions' records interleaved in the order they were written
                    # (each partition's own order kept): an effect on another topic
                    # rarely comes before its cause, which a projection must hold back
                    for rec in heapq.merge(*(rs for _, rs in work), key=_written_at):
                        outcomes.append((rec.topic, await keys.apply(rec)))
                    nxt = {tp: records[-1].offset + 1 for tp, records in work}
                    await save_positions(conn, self.group, nxt)
                self.metrics.observe_steps(self.service, steps)
            except Exception as exc:
                log.info(
                    "%s lane of %d partition batches failed (%s): one partition at a time",
                    self.group,
                    len(work),
                    said(exc),
                )
            else:
                for _, records in work:
                    self.metrics.batch_size.labels(self.service).observe(len(records))
                for topic, outcome in outcomes:
                    self.metrics.records.labels(self.service, topic, outcome).inc()
                return {tp: True for tp, _ in work}
        return {tp: await self.process(tp, records, fetched[tp]) for tp, records in work}

    async def process(self, tp: TopicPartition, records: list[Record], fetched: int) -> bool:
        """Apply ``records`` and move the stored position past them; False when the
        partition was revoked meanwhile (the rest is the new owner's). ``fetched``: the
        revocations the member had seen when it fetched them."""
        self.metrics.batch_size.labels(self.service).observe(len(records))
        outcomes: list[tuple[str, str]] = []
        try:
            async with self.kept.begin() as conn:
                deferred.defer(conn)
                steps = track_steps(conn)
                keys = await self._load(conn, records)
                for rec in records:
                    outcomes.append((rec.topic, await keys.apply(rec)))
                await save_position(conn, self.group, tp, records[-1].offset + 1)
            self.metrics.observe_steps(self.service, steps)
        except Exception as exc:
            if len(records) > 1 or not isinstance(exc, PermanentError):
                log.info(
                    "%s batch of %d failed (%s): one at a time",
                    self.group,
                    len(records),
                    said(exc),
                )
            outcomes = []
            async with self._one_at_a_time:
                for rec in records:
                    with bound(**self.inbox.log_fields(rec)):  # its retries and dead letter
                        outcomes.append((rec.topic, await self._process_one(tp, rec, fetched)))
                    if outcomes[-1][1] == REVOKED:
                        break  # this record and the rest of the batch are the new owner's
        for topic, outcome in outcomes:
            self.metrics.records.labels(self.service, topic, outcome).inc()
        return outcomes[-1][1] != REVOKED

    async def _load(self, conn: AsyncConnection, records: list[Record]) -> BlockedKeys:
        """The batch's view of its blocked keys and its claims (``KeyBlocking.load``),
        then the service's ``prepare`` for the records its handlers will be given."""
        keys = await self.blocking.load(conn, records)
        if self.prepare is not None and keys.claims is not None:
            await self.prepare(conn, keys.claims.fresh(records))
        return keys

    async def _process_one(self, tp: TopicPartition, rec: Record, fetched: int) -> str:
        attempt, first_failure, started = 0, datetime.now(UTC), time.monotonic()
        while True:
            attempt += 1
            if attempt > 1 and not self.member.owns(tp, fetched):
                return self._left_to_new_owner(tp, rec)
            # once the budget is spent, a release dead-letters a blocked record that still
            # fails transiently instead of failing as a whole
            last_attempt = time.monotonic() - started >= self.retry_budget_s
            try:
                async with self.engine.begin() as conn:
                    deferred.defer(conn)
                    steps = track_steps(conn)
                    keys = self.blocking.open(conn, last_attempt=last_attempt)
                    outcome = await keys.apply(rec)
                    await save_position(conn, self.group, tp, rec.offset + 1)
                self.metrics.observe_steps(self.service, steps)
                return outcome
            except Exception as exc:
                if attempt == 1:
                    first_failure = datetime.now(UTC)
                spent = time.monotonic() - started
                if rec.topic == self.blocking.control_topic:  # retried, never dead-lettered
                    if not is_transient(exc) or last_attempt:
                        if not self.member.owns(tp, fetched):  # the new owner completes it
                            return self._left_to_new_owner(tp, rec)
                        return await self._abandon_control(tp, rec, exc)
                    self.metrics.retries.labels(self.service, type(exc).__name__).inc()
                    await self.member.backoff(attempt)
                    continue
                if not is_transient(exc) or spent >= self.retry_budget_s:
                    outcome = await self._dead_letter(tp, rec, exc, attempt, first_failure, fetched)
                    if outcome == REVOKED:
                        return self._left_to_new_owner(tp, rec)
                    return outcome
                self.metrics.retries.labels(self.service, type(exc).__name__).inc()
                await self.member.backoff(attempt)

    def _left_to_new_owner(self, tp: TopicPartition, rec: Record) -> str:
        log.info(
            "%s %s/%d was revoked while %d was retried: the record is left to its new owner",
            self.group,
            tp.topic,
            tp.partition,
            rec.offset,
        )
        return REVOKED

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
            async with self.engine.begin() as conn:
                await save_position(conn, self.group, tp, rec.offset + 1)

        await self.member.until_done(move_on, "dead-letter step")
        return "control_failed"

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
            if not self.member.owns(tp, fetched):
                return REVOKED
            async with self.engine.begin() as conn:
                if await self.inbox.contains(conn, rec):
                    await save_position(conn, self.group, tp, rec.offset + 1)
                    return "duplicate"
                if record:
                    await self.blocking.record_dead_letter(conn, rec, exc, attempts, first)
                    await save_position(conn, self.group, tp, rec.offset + 1)
            return None

        async def publish() -> str | None:
            if not self.member.owns(tp, fetched):
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
            why = await self.member.until_done(
                publish, "dead-letter step"
            ) or await self.member.until_done(lambda: settled(record=True), "dead-letter step")
        if why == "duplicate":
            log.info(
                "%s %s/%d@%d was applied meanwhile (its inbox key is entered): not dead-lettered",
                self.group,
                rec.topic,
                rec.partition,
                rec.offset,
            )
        return why or "dead_lettered"
