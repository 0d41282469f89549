"""Stored consumer positions: where each partition continues, and what is done when a
position does not fit the log (``consumer.py`` states the guarantees).

The position of a partition is the next offset to process, stored in the service's
database in the transaction that processed the records below it (``save_position``),
and only ever moved forward — except by the reset of a position beyond the log end.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import Insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import deferred
from services.runtime.errors import is_transient, said
from services.runtime.member import Member
from services.runtime.messages import Record
from services.runtime.metrics import RuntimeMetrics
from services.runtime.tables import consumer_positions

log = logging.getLogger("paysaga.consumer")

#: clock skew between record timestamps and the inbox's ``received_at``, and prune timing
_INBOX_MARGIN = timedelta(hours=1)


class Positions:
    """The stored positions of one consumer group's partitions, as this member knows
    them: ``expected`` (the next offset to process; absent = not loaded yet, None = the
    group never processed the partition) and ``alarms`` (partitions whose stored position
    was beyond the log end, or missing while Kafka had a committed offset, until they
    caught up: ``/readyz``)."""

    def __init__(
        self,
        *,
        group: str,
        service: str,
        engine: AsyncEngine,
        metrics: RuntimeMetrics,
        inbox_retention: timedelta,
        member: Member,
    ) -> None:
        self.group, self.service, self.engine, self.metrics = group, service, engine, metrics
        #: how long the inbox remembers an applied record (the relay prunes it after)
        self.inbox_retention = inbox_retention
        self.member = member
        #: next offset to process per partition, from the database; absent = not loaded
        self.expected: dict[TopicPartition, int | None] = {}
        #: partitions whose position did not fit the log (beyond its end, or lost while
        #: Kafka had a committed offset): the log end they had then, and what
        #: ``/readyz`` says about them until they reach it
        self.alarms: dict[TopicPartition, tuple[int, str]] = {}
        #: partitions whose last batches were records the group ignores, every one: the
        #: next offset, not stored yet (``skip``, ``store_skipped``)
        self.skipped: dict[TopicPartition, int] = {}
        self._skipped_since: float | None = None

    def skip(self, tp: TopicPartition, nxt: int) -> None:
        """``tp``'s records below ``nxt`` were all ignored by the group: its position
        moves there, stored later (``store_skipped``). Until it is, a restart re-reads
        them and ignores them again."""
        self.skipped[tp] = self.expected[tp] = nxt
        if self._skipped_since is None:
            self._skipped_since = time.monotonic()

    def saved(self, positions: Mapping[TopicPartition, int]) -> None:
        """Positions stored with an applied batch, past any skipped records."""
        for tp in positions:
            self.skipped.pop(tp, None)

    async def store_skipped(self, every_s: float) -> dict[TopicPartition, int]:
        """Store the positions past skipped records in one write once the oldest waited
        ``every_s``; what was stored (nothing yet, or when the write failed: tried again
        on the next call)."""
        since = self._skipped_since
        if since is None or time.monotonic() - since < every_s:
            return {}
        positions = dict(self.skipped)
        try:
            async with self.engine.begin() as conn:
                await save_positions(conn, self.group, positions)
        except Exception as exc:
            log.info("%s positions past skipped records not stored yet: %s", self.group, said(exc))
            return {}
        for tp, nxt in positions.items():
            if self.skipped.get(tp) == nxt:
                del self.skipped[tp]
        self._skipped_since = time.monotonic() if self.skipped else None
        return positions

    def forget(self, tp: TopicPartition) -> None:
        """Reload ``tp``'s position from the database before its next batch."""
        self.expected.pop(tp, None)

    def revoked(self, tp: TopicPartition) -> None:
        self.expected.pop(tp, None)
        self.skipped.pop(tp, None)
        self.alarms.pop(tp, None)

    def problems(self) -> list[str]:
        """What makes positions not ready (``/readyz``): partitions whose stored position
        was beyond the log end (``_beyond_log_end``) or missing while Kafka had a
        committed offset (``_no_stored_position``), until they caught up with the log end
        they had then."""
        return sorted(reason for _, reason in self.alarms.values())

    async def check_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        """Clear the alarm of a partition polled and processed up to the log end its
        reset position had."""
        for tp, (end, _) in list(self.alarms.items()):
            if tp in consumer.assignment() and await consumer.position(tp) >= end:
                del self.alarms[tp]
                log.info(
                    "%s %s/%d: re-read up to %d after the position reset",
                    self.group,
                    tp.topic,
                    tp.partition,
                    end,
                )

    async def in_position(self, tp: TopicPartition, records: list[Record]) -> list[Record]:
        """The records of a batch that continue from the stored position. Records below
        it were processed already. Right after (re)loading the position, a batch starting
        above it (the consumer was placed elsewhere, e.g. by its Kafka-committed offset)
        is dropped and the partition sought to the stored position — once: offsets
        missing from a log are normal (compacted away, a transaction marker, retention),
        so whatever Kafka returns from there on is taken as the continuation. A batch all
        below the position may mean the position is beyond the log end: checked."""
        consumer = self.member.consumer
        assert consumer is not None
        if tp not in self.expected:
            stored = self.expected[tp] = await self.stored(tp)
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
        records below that offset are not read — a warning, counted, and ``/readyz`` red
        until the partition has caught up with the log end it had then."""
        consumer = self.member.consumer
        assert consumer is not None
        at = records[0].offset if records else "?"
        where = f"{self.group} {tp.topic}/{tp.partition}: no stored position"
        try:
            committed = await consumer.committed(tp)
            end = (await consumer.end_offsets([tp]))[tp] if committed is not None else 0
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
        self.alarms[tp] = (
            end,
            f"{tp.topic}/{tp.partition}: no stored position, but the group's committed offset"
            f" in Kafka is {committed}: records below it are not read (the database lost its"
            " consumer_positions?)",
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
        consumer = self.member.consumer
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
        await self.member.until_done(lambda: self._reset_position(tp, nxt), "position reset")
        self.metrics.position_anomalies.labels(self.service, tp.topic, "beyond_log_end").inc()
        self.alarms[tp] = (
            end,
            f"{tp.topic}/{tp.partition}: stored position {expected} was beyond the log end"
            f" {end} (a recreated topic?); re-reading it from offset {nxt} (log start {start})",
        )
        consumer.seek(tp, nxt)
        self.expected[tp] = nxt
        return True

    async def _reset_position(self, tp: TopicPartition, nxt: int) -> None:
        """Set the stored position back (``save_position`` only moves it forward)."""
        async with self.engine.begin() as conn:
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
        consumer = self.member.consumer
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

    async def stored(self, tp: TopicPartition) -> int | None:
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
                await self.member.backoff(attempt)

    # ------------------------------------------------------------------ processing


async def save_position(conn: AsyncConnection, group: str, tp: TopicPartition, nxt: int) -> None:
    """Store ``nxt`` as the next offset of ``tp`` for ``group``, in ``conn``'s transaction."""
    await save_positions(conn, group, {tp: nxt})


async def save_positions(
    conn: AsyncConnection, group: str, positions: Mapping[TopicPartition, int]
) -> None:
    """Store the next offset of each partition for ``group`` in one statement, in
    ``conn``'s transaction — with what the transaction collected (``deferred.folded``)."""
    rows = [
        {"consumer_group": group, "topic": tp.topic, "partition": tp.partition, "next_offset": n}
        for tp, n in sorted(positions.items())
    ]
    await deferred.folded(conn, _POSITIONS, rows)


@dataclasses.dataclass(frozen=True)
class _Forward:
    """A stored position only moves forward, even if a revoked member commits late."""

    def __call__(self, stmt: Insert, columns: tuple[str, ...]) -> Insert:
        return stmt.on_conflict_do_update(
            index_elements=["consumer_group", "topic", "partition"],
            set_={
                "next_offset": func.greatest(
                    consumer_positions.c.next_offset, stmt.excluded.next_offset
                ),
                "updated_at": func.now(),
            },
        )


_POSITIONS = deferred.Rows(
    consumer_positions, ("consumer_group", "topic", "partition", "next_offset"), _Forward()
)
