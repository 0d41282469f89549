"""Key blocking: a dead letter blocks its order key for its consumer group, the key's
later records are stored behind it as *blocked records* (table ``parked``; the
consumed-records outcome ``parked``), and a replay or purge of the dead letter releases
them (``consumer.py`` states the guarantees).

The group's dead-letter topic is also its control channel: replays and releases
(purges, ``paysaga dlq``) arrive there, never on a topic that others read, and act only
while the dead letter they name is open — so repeating one is harmless.

``KeyBlocking`` is the machinery of one consumer group; ``BlockedKeys`` is what one
transaction knows of its blocked keys and may do with them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from sqlalchemy import and_, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime import deferred, dlq, driver
from services.runtime.errors import describe, is_transient, said
from services.runtime.inbox import Claims, Inbox
from services.runtime.locks import xact_lock
from services.runtime.messages import Record
from services.runtime.metrics import RuntimeMetrics
from services.runtime.tables import blocked_records, dead_letters
from services.runtime.topics import load_specs
from services.runtime.tracing import TRACEPARENT, span

log = logging.getLogger("paysaga.consumer")

#: A batch's blocked keys (its open dead letters' order keys) and the inbox keys of its
#: claimable records not of a blocked key, entered — sorted by code point, as
#: ``Inbox.enter`` sorts: two members entering overlapping keys wait in one order. The
#: keys that were new come back ``entered``.
_LOAD = text(
    """
    WITH blocked AS (
        SELECT DISTINCT order_key FROM dead_letters
        WHERE consumer_group = CAST(:group AS text)
          AND order_key = ANY(CAST(:keys AS text[]))
          AND resolved_at IS NULL
    ), entered AS (
        INSERT INTO inbox (consumer_group, dedupe_key)
        SELECT DISTINCT CAST(:group AS text), c.dedupe COLLATE "C"
        FROM unnest(CAST(:dedupes AS text[]), CAST(:owners AS text[])) AS c(dedupe, owner)
        WHERE c.owner NOT IN (SELECT order_key FROM blocked)
        ORDER BY 2
        ON CONFLICT DO NOTHING
        RETURNING dedupe_key
    )
    SELECT 'blocked', order_key FROM blocked
    UNION ALL
    SELECT 'entered', dedupe_key FROM entered
    """
)
_LOAD_SQL = driver.sql_of(_LOAD)

#: Called in the dead-letter transaction, so a service can flag what the record was
#: about (payments flags the order for reconciliation).
DeadLetterHook = Callable[[AsyncConnection, Record, BaseException], Awaitable[None]]


@functools.cache
def _own_key_space_topics() -> frozenset[str]:
    """Topics whose record key is not an order id (``catalog.stock.v1``: the SKU).
    Topics topics.yaml does not list keep the record key as it is."""
    return frozenset(spec.name for spec in load_specs() if not spec.keyed_by_order)


def order_key(rec: Record) -> str:
    """The key a dead letter of ``rec`` blocks: the order id, as a rule."""
    # records without a key have no per-order ordering to protect: block only themselves
    if not rec.key_str:
        return f"{rec.topic}/{rec.partition}/{rec.offset}"
    # a SKU "X" that is dead-lettered must not block the records of an order "X"
    return f"{rec.topic}:{rec.key_str}" if rec.topic in _own_key_space_topics() else rec.key_str


class KeyBlocking:
    """The dead letters of one consumer group, the records blocked behind them and their
    release."""

    def __init__(
        self,
        *,
        group: str,
        service: str,
        inbox: Inbox,
        producer: dlq.DeadLetterProducer,
        metrics: RuntimeMetrics,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.group, self.service, self.inbox = group, service, inbox
        self.producer, self.metrics, self.on_dead_letter = producer, metrics, on_dead_letter
        #: the group's dead-letter topic, its control channel too
        self.control_topic = dlq.dlq_topic(group)

    def open(
        self, conn: AsyncConnection, blocked: set[str] | None = None, *, last_attempt: bool = False
    ) -> BlockedKeys:
        """``conn``'s transaction's view: ``blocked`` — the keys known to be blocked
        (loaded for a batch) — or None to ask the database per record."""
        return BlockedKeys(self, conn, blocked, last_attempt)

    async def load(self, conn: AsyncConnection, records: list[Record]) -> BlockedKeys:
        """The view of a batch, in one statement instead of one per record (``_LOAD``):
        its blocked keys, and the inbox keys of the records that go straight to the inbox
        (neither control records nor of a blocked key) entered — their claims
        (``Inbox.claimable``)."""
        claims = self.inbox.claimable([r for r in records if r.topic != self.control_topic])
        owners = {at: order_key(r) for r in records if (at := r.at) in claims.routes}
        claimed = sorted({(claims.routes[at][1], owner) for at, owner in owners.items()})
        found = await driver.rows(
            conn,
            _LOAD_SQL,
            {
                "group": self.group,
                "keys": sorted({order_key(r) for r in records}),
                "dedupes": [d for d, _ in claimed],
                "owners": [k for _, k in claimed],
            },
        )
        blocked: set[str] = set()
        for kind, key in found:
            (blocked if kind == "blocked" else claims.entered).add(key)
        for at, owner in owners.items():
            if owner in blocked:  # not claimed: parked behind its dead letter, or a duplicate
                del claims.routes[at]
        view = self.open(conn, blocked)
        view.claims = claims
        return view

    async def record_dead_letter(
        self, conn: AsyncConnection, rec: Record, exc: BaseException, attempts: int, first: datetime
    ) -> None:
        """The dead_letters row (it blocks the key) and the service's hook."""
        await conn.execute(
            insert(dead_letters).values(
                consumer_group=self.group,
                order_key=order_key(rec),
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                error_class=type(exc).__name__,
                error_message=describe(exc)[:2000],
                attempts=attempts,
                first_failure_at=first,
                dedupe_key=self.inbox.dedupe_key(rec),
            )
        )
        if self.on_dead_letter is not None:
            # what the hook emits (an order flagged) continues the dead-lettered record's trace
            with span(f"{self.group} dead letter", rec.header(TRACEPARENT)):
                await self.on_dead_letter(conn, rec, exc)

    async def is_blocked(self, conn: AsyncConnection, key: str) -> bool:
        row = await conn.execute(
            select(dead_letters.c.id)
            .where(
                and_(
                    dead_letters.c.consumer_group == self.group,
                    dead_letters.c.order_key == key,
                    dead_letters.c.resolved_at.is_(None),
                )
            )
            .limit(1)
        )
        return row.first() is not None

    async def lock(self, conn: AsyncConnection, key: str) -> None:
        """Serialize blocking and releasing records of one key across members (until commit)."""
        await xact_lock(conn, f"{self.group}|{key}")

    async def is_dead_letter(self, conn: AsyncConnection, rec: Record) -> bool:
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

    async def named_dead_letter(self, conn: AsyncConnection, rec: Record) -> str | None:
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


class BlockedKeys:
    """What one transaction knows of blocked keys and does with them.

    ``known`` — the keys of a batch known to be blocked, kept current as a replay or
    purge in the batch changes them — or None: asked of the database per record. On
    the retry budget's ``last_attempt`` a blocked record that still fails transiently
    is dead-lettered instead of failing its release as a whole."""

    def __init__(
        self,
        blocking: KeyBlocking,
        conn: AsyncConnection,
        known: set[str] | None,
        last_attempt: bool,
    ) -> None:
        self.blocking, self.conn, self.known, self.last_attempt = (
            blocking,
            conn,
            known,
            last_attempt,
        )
        #: the inbox keys a batch claimed for its records (``KeyBlocking.load``)
        self.claims: Claims | None = None

    async def apply(self, rec: Record) -> str:
        """Handle one record inside the transaction; returns the outcome label.

        Control headers (replay, release, target group) count only on a record read from
        the group's own dead-letter topic, which only paysaga writes: on every other
        topic — inputs that others produce to above all — a ``paysaga-`` header carries
        no authority, and the record is processed like any other (docs/contract.md §1)."""
        b = self.blocking
        control = rec.topic == b.control_topic
        if control:
            view = dlq.control_view(rec)
            if view is None:
                return "skipped"  # a dead letter itself: for the operator, not for us
            if rec.header(dlq.H_TARGET_GROUP) != b.group.encode():
                return "skipped"  # a replay or release meant for another consumer group
            rec = view
        key = order_key(rec)
        release = control and rec.header(dlq.H_CONTROL) == dlq.CONTROL_RELEASE
        replay = control and rec.header(dlq.H_REPLAY_OF) is not None
        if release or replay:
            named = await b.named_dead_letter(self.conn, rec)
            if named is None:
                # its dead letter was resolved already (a repeated replay or purge, or a
                # replay of a purged record): acting again would unblock the key past a
                # record that failed since, or apply an event after its successors
                return "skipped"
            key = named
        if release:
            await self.release(key, "purged")
            return "released"
        if not control and b.inbox.ignores(rec):
            return "skipped"  # nothing to apply in order behind a dead letter either
        if not replay and (self.known is None or key in self.known):
            blocked_as = await self._block(key, rec)
            if blocked_as is not None:
                return blocked_as
        outcome = await b.inbox.handle(self.conn, rec, None if control else self.claims)
        if replay:
            await self.release(key, "replayed")
        return outcome

    async def _block(self, key: str, rec: Record) -> str | None:
        """Store ``rec`` as a blocked record if its key is blocked; None (apply it) if
        it is not. Under the key's lock: a release on another member either sees this
        blocked record or has
        already freed the key (then this record is applied, after the released ones)."""
        b, conn = self.blocking, self.conn
        await b.lock(conn, key)
        if not await b.is_blocked(conn, key):
            if self.known is not None:
                self.known.discard(key)
            return None
        if await b.is_dead_letter(conn, rec):
            return "duplicate"  # the failed record itself, read again (a rebalance)
        # stored without card data (released, a redacted record is rejected anyway)
        value, _ = dlq.redacted_value(rec.value)
        await conn.execute(
            insert(blocked_records).values(
                consumer_group=b.group,
                order_key=key,
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
        return "parked"  # the outcome label (metrics)

    async def release(self, key: str, resolution: str) -> None:
        """Resolve the key's open dead letters, then apply its blocked records in order,
        in this same transaction. The resolved records' inbox keys are entered, so a
        purged record's other copies (a relay re-publishing it, say) are duplicates from
        now on. A blocked record that fails permanently — or, on the ``last_attempt``,
        transiently — becomes the key's dead letter in turn and the records behind it
        stay blocked: a release never skips a record, and never fails the replay or purge
        behind it."""
        await self._release(key, resolution)
        if self.known is not None:
            # the key is free — unless a blocked record failed and blocks it
            self.known.discard(key)
            if await self.blocking.is_blocked(self.conn, key):
                self.known.add(key)

    async def _release(self, key: str, resolution: str) -> None:
        b, conn = self.blocking, self.conn
        await b.lock(conn, key)
        resolved = await conn.execute(
            update(dead_letters)
            .where(
                and_(
                    dead_letters.c.consumer_group == b.group,
                    dead_letters.c.order_key == key,
                    dead_letters.c.resolved_at.is_(None),
                )
            )
            .values(resolved_at=datetime.now(UTC), resolution=resolution)
            .returning(dead_letters.c.dedupe_key)
        )
        await b.inbox.enter(conn, {k for k in resolved.scalars() if k is not None})
        if await b.is_blocked(conn, key):
            # the same release ran concurrently (two members around a rebalance), got
            # here first and stopped at a new poison record, which now blocks the key
            return
        rows = (
            await conn.execute(
                select(blocked_records)
                .where(
                    and_(
                        blocked_records.c.consumer_group == b.group,
                        blocked_records.c.order_key == key,
                    )
                )
                .order_by(blocked_records.c.id)
                .with_for_update()
            )
        ).all()
        # what the batch collected before is written first: its failure is not a
        # released record's (which would be dead-lettered for it)
        await deferred.write_now(conn)
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
                    await b.inbox.handle(conn, rec)
            except Exception as exc:
                if is_transient(exc) and not self.last_attempt:
                    raise  # the whole release is retried with backoff
                await self._dead_letter_blocked(rec, exc)
                done.append(row.id)
                break
            done.append(row.id)
        if done:
            await conn.execute(delete(blocked_records).where(blocked_records.c.id.in_(done)))

    async def _dead_letter_blocked(self, rec: Record, exc: Exception) -> None:
        """Dead-letter a blocked record inside the release's transaction. Published first
        (acks=all): should the transaction then fail, the release is retried and the dead
        letter may be published twice — never lost."""
        b = self.blocking
        log.warning(
            "%s dead-lettering blocked %s/%d@%d: %s",
            b.group,
            rec.topic,
            rec.partition,
            rec.offset,
            said(exc),
        )
        now = datetime.now(UTC)
        headers = dlq.headers_for(rec, b.group, exc, 1, now)
        await b.producer.send_dead_letter(b.group, rec, headers)
        await b.record_dead_letter(self.conn, rec, exc, 1, now)
        b.metrics.records.labels(b.service, rec.topic, "dead_lettered").inc()
