"""The outbox relay: publishes a service's outbox rows to Kafka, in order.

Guarantees:

* One active relay per service database: the relay holds a session-level PostgreSQL
  advisory lock on its own connection. A second instance waits (retrying the lock) and
  takes over as soon as the first one's connection is gone — e.g. its process died.
* Rows are published in id order through one idempotent producer (acks=all), each with
  its stored key (the order id), so one order's events keep their order on a partition.
  Rows are marked sent only after Kafka acknowledged them. A crash between the two
  re-publishes those rows; consumers' inboxes absorb the duplicates.
* A row of a key is sent only once every earlier row of that key is acknowledged (a
  pass goes out in waves: the first unsent row of each key, then the second, ...), so a
  refused row can never be overtaken by a later row of its order, on any topic.
* A row Kafka refuses for good (``errors.refused_by_kafka``: too large for the topic's
  ``max.message.bytes``, say) is set aside, not deleted: marked ``dead`` with the error,
  logged once, counted in ``paysaga_outbox_stuck_records``. Later rows of its key wait
  behind it (one order's events must not overtake each other); every other key goes on.
  ``paysaga outbox retry`` puts it back once the cause is fixed. A batch fails as a
  whole, so a failed wave is re-sent row by row on a fresh producer to find the row at
  fault; any other failure stands the relay down to retry the pass later.
* Woken by LISTEN/NOTIFY when a handler commits outbox rows; a slow poll is the
  fallback when a notification is missed.
* The gauges (backlog, oldest age, stuck rows, open dead letters: one aggregate over
  the outbox) are read at most every ``stats_every_s``, not on every pass: at once on
  taking the lead and after a pass that set a row aside, and within ``stats_every_s``
  after the last pass of a burst, notification or not.
* Sent rows and inbox rows past their retention are pruned; a row of a topic in
  ``FORGOTTEN_ONCE_SENT`` (the payment requests, which carry the gateway's client
  secret) is deleted instead of marked sent, by its id, in the same statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidTopicError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import BigInteger, any_, bindparam, delete, exists, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import driver
from services.runtime.errors import refused_by_kafka, said
from services.runtime.faults import fault_point
from services.runtime.kafka import client_options
from services.runtime.kept import KeptConnections
from services.runtime.metrics import RuntimeMetrics
from services.runtime.outbox import OUTBOX_CHANNEL
from services.runtime.tables import dead_letters, inbox, outbox
from services.runtime.topics import PAYMENT_REQUESTS_TOPIC
from services.runtime.wakeup import listen, wait_for_notification

log = logging.getLogger("paysaga.relay")

#: topics whose outbox rows are deleted once Kafka has them, not kept for the retention:
#: a PaymentRequested carries the gateway's client secret (docs/contract.md §3.7)
FORGOTTEN_ONCE_SENT = frozenset({PAYMENT_REQUESTS_TOPIC})


class RelaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_RELAY_", extra="ignore")

    batch: int = 500
    poll_s: float = 2.0
    lock_retry_s: float = 1.0
    outbox_retention_h: float = 24.0
    #: at least the longest redelivery window (Kafka retention of the saga topics)
    inbox_retention_days: float = 7.0
    prune_every_s: float = 300.0
    #: how often the gauges are read from the outbox (an aggregate: once per pass, a
    #: busy relay would run it on every wake-up); a row set aside shows at once
    stats_every_s: float = 1.0


class OutboxRelay:
    def __init__(
        self,
        *,
        service: str,
        engine: AsyncEngine,
        conninfo: str,
        bootstrap: str,
        metrics: RuntimeMetrics,
        settings: RelaySettings,
    ) -> None:
        self.service, self.engine, self.conninfo = service, engine, conninfo
        self.bootstrap, self.metrics, self.settings = bootstrap, metrics, settings
        self.lock_key = zlib.crc32(f"paysaga-relay:{service}".encode())
        self.active = False
        #: when the gauges were last read (``_update_backlog``), and whether a pass ran since
        self._stats_at = -math.inf
        self._stats_stale = False
        #: started when the relay takes the lead (see _lead)
        self._producer: AIOKafkaProducer
        #: the connection of its passes, kept from one pass to the next while it leads
        self.kept = KeptConnections(engine, autocommit=True)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._lead(stop)
            except Exception as exc:  # database or broker gone: stand down, then compete again
                self.active = False
                log.warning("%s relay stopped publishing: %s", self.service, said(exc))
                await _wait(stop, self.settings.lock_retry_s)

    async def _lead(self, stop: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            while not stop.is_set():
                cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_key,))
                row = await cur.fetchone()
                if row and row[0]:
                    break
                await _wait(stop, self.settings.lock_retry_s)  # standby
            else:
                return
            self.active = True
            log.info("%s relay is active", self.service)
            await listen(conn, OUTBOX_CHANNEL)
            self._producer = await self._start_producer()
            try:
                async with self.kept.while_running():
                    await self._publish(stop, conn)
            finally:
                self.active = False
                await self._producer.stop()

    async def _publish(self, stop: asyncio.Event, conn: psycopg.AsyncConnection[Any]) -> None:
        """Publish while leading: a pass on each notification (``conn`` listens), the
        outbox pruned every ``prune_every_s``."""
        if dead := await self._update_backlog():
            log.error(
                "%s outbox: %d row(s) refused by Kafka for good wait for an operator"
                " (`paysaga outbox list`)",
                self.service,
                dead,
            )
        last_prune = -math.inf  # prune at once on taking the lead, then every prune_every_s
        while not stop.is_set():
            while await self._publish_batch():
                pass
            if time.monotonic() - last_prune > self.settings.prune_every_s:
                await self._prune()
                last_prune = time.monotonic()
            await wait_for_notification(conn, self._wait_s())

    def _stats_due(self) -> bool:
        return time.monotonic() - self._stats_at >= self.settings.stats_every_s

    def _wait_s(self) -> float:
        """How long to wait for a notification: ``poll_s``, or until the gauges are due
        if a pass ran since they were read (so they settle when the relay goes idle)."""
        if not self._stats_stale:
            return self.settings.poll_s
        due_in = self._stats_at + self.settings.stats_every_s - time.monotonic()
        return max(0.01, min(self.settings.poll_s, due_in))

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            **client_options(self.bootstrap),
            client_id=f"paysaga-{self.service}-relay",
            enable_idempotence=True,
            acks="all",
            linger_ms=2,
            request_timeout_ms=15000,
        )
        await producer.start()
        return producer

    async def _publish_batch(self) -> bool:
        """Publish up to ``batch`` unsent rows, in waves; True if there may be more.

        One connection in autocommit serves the pass — the read, one UPDATE marking
        every acknowledged row, the gauges when due — instead of a transaction per
        statement (each a checkout, BEGIN and COMMIT: round trips that cost more than
        the rows); it is kept for the next pass while the relay leads (``kept``).
        Marking once after the waves keeps the guarantee: a row is marked only after its
        acknowledgement, and a crash before the mark re-publishes rows the consumers'
        inboxes absorb."""
        async with self.kept.autocommit() as conn:
            rows = await driver.rows(conn, _UNSENT_SQL, {"limit": self.settings.batch})
            blocked: set[bytes] = set()  # keys of rows set aside during this pass
            sent: list[Any] = []
            try:
                for wave in _waves(rows):
                    await self._publish_wave(
                        conn, [r for r in wave if r.key not in blocked], blocked, sent
                    )
            finally:
                await self._mark_sent(conn, sent)
            if self._stats_due():
                await self._update_backlog(conn)
            else:
                self._stats_stale = True
        return len(rows) == self.settings.batch

    async def _publish_wave(
        self,
        conn: AsyncConnection,
        wave: list[Any],
        blocked: set[bytes],
        sent: list[Any],
    ) -> None:
        """Send rows of distinct keys without waiting for each ack (the idempotent
        producer keeps the order per partition); the acknowledged ones join ``sent``."""
        results = await self._send(wave)
        fault_point("relay_after_send_before_mark")
        sent += [r for r, exc in zip(wave, results, strict=True) if exc is None]
        failed = [r for r, exc in zip(wave, results, strict=True) if exc is not None]
        if not failed:
            return
        # Kafka fails a batch as a whole (innocent rows beside a too-large one) and the
        # producer's sequence numbers are now off: start afresh, send each row alone
        await self._producer.stop()
        self._producer = await self._start_producer()
        for r in failed:
            [exc] = await self._send([r])
            if exc is None:
                sent.append(r)
            elif refused_by_kafka(exc):
                await self._mark_dead(conn, r, exc)
                if r.key is not None:
                    blocked.add(r.key)
            else:
                raise exc

    async def _send(self, rows: Sequence[Any]) -> list[BaseException | None]:
        """Each row's outcome: None once acknowledged, else the error."""
        futures: list[asyncio.Future[Any]] = []
        for r in rows:
            try:
                if not _TOPIC_NAME.fullmatch(r.topic):  # Kafka would only time out on it
                    raise InvalidTopicError(f"illegal topic name {r.topic!r}")
                headers = [(k, v.encode()) for k, v in r.headers]
                futures.append(
                    await self._producer.send(r.topic, value=r.value, key=r.key, headers=headers)
                )
            except Exception as exc:  # refused before it was queued: its outcome
                failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                futures.append(failed)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        return [o if isinstance(o, BaseException) else None for o in outcomes]

    async def _mark_sent(self, conn: AsyncConnection, rows: list[Any]) -> None:
        """Mark the acknowledged ``rows`` sent — or delete those of a topic in
        ``FORGOTTEN_ONCE_SENT`` — in one statement."""
        if not rows:
            return
        keep = [r.id for r in rows if r.topic not in FORGOTTEN_ONCE_SENT]
        forget = [r.id for r in rows if r.topic in FORGOTTEN_ONCE_SENT]
        params = {"keep": keep, "forget": forget, "sent_at": datetime.now(UTC)}
        await driver.execute(conn, _MARK_SENT_FORGET_SQL if forget else _MARK_SENT_SQL, params)
        self.metrics.outbox_published.labels(self.service).inc(len(rows))

    async def _mark_dead(self, conn: AsyncConnection, r: Any, exc: BaseException) -> None:
        """Set the row aside with its error; said once, here, not on every pass; the
        gauges show it at the end of the pass."""
        await conn.execute(
            update(outbox)
            .where(outbox.c.id == r.id, outbox.c.sent_at.is_(None))
            .values(dead_at=func.now(), dead_error=said(exc))
        )
        self._stats_at = -math.inf
        log.error(
            "%s outbox row %s refused by Kafka for good, set aside (dead): topic %s, event %s,"
            " key %s, %d bytes: %s. Later rows of its key wait; fix the cause, then"
            " `paysaga outbox retry %s %s`",
            self.service,
            r.id,
            r.topic,
            event_type_of(r.value),
            (r.key or b"").decode(errors="replace"),
            len(r.value),
            said(exc),
            self.service,
            r.id,
        )

    async def _update_backlog(self, conn: AsyncConnection | None = None) -> int:
        """Set the backlog gauges and the open dead letters of the service's store (its
        consumer group's) — one statement, on ``conn`` if given; returns the number of
        dead rows."""
        if conn is None:
            async with self.engine.connect() as own:
                return await self._update_backlog(own)
        open_dead_letters = (
            select(func.count()).where(dead_letters.c.resolved_at.is_(None)).scalar_subquery()
        )
        count, oldest, dead, blocked, dead_letters_open = (
            await conn.execute(
                select(
                    func.count(),
                    func.min(outbox.c.created_at),
                    func.count().filter(outbox.c.dead_at.is_not(None)),
                    func.count().filter(outbox.c.dead_at.is_(None), _BEHIND_DEAD),
                    open_dead_letters,
                ).where(outbox.c.sent_at.is_(None))
            )
        ).one()
        self.metrics.outbox_backlog.labels(self.service).set(count)
        self.metrics.dead_letters_open.labels(self.service).set(dead_letters_open)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0
        self.metrics.outbox_oldest_age.labels(self.service).set(age)
        self.metrics.outbox_stuck.labels(self.service, "dead").set(dead)
        self.metrics.outbox_stuck.labels(self.service, "blocked").set(blocked)
        self._stats_at, self._stats_stale = time.monotonic(), False
        return int(dead)

    async def _prune(self) -> None:
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(outbox).where(
                    outbox.c.sent_at < now - timedelta(hours=self.settings.outbox_retention_h)
                )
            )
            # on the clock that stamped received_at (the database's): a relay host whose
            # clock runs ahead must not forget applied records early
            await conn.execute(
                delete(inbox).where(
                    inbox.c.received_at
                    < func.now() - timedelta(days=self.settings.inbox_retention_days)
                )
            )


#: a dead row, as seen from the rows behind it
_dead = outbox.alias("dead")

#: The first dead row of each key that has one (as a rule none), read once per
#: statement. As a subquery correlated to each unsent row, PostgreSQL looked each one up
#: through the index of unsent rows (its predicate matches too) and filtered them all:
#: a pass over n unsent rows read n² index entries (86 ms, 14,280 buffers for 204 rows
#: at 50 orders/s), and a relay that fell behind fell further behind. Now each read costs
#: buffers in proportion to the unsent rows. Its one quadratic left is in memory: with
#: statistics taken before many keys died, each unsent row is compared with every dead key
#: (437 ms for 2,400 rows and 2,000 dead keys in the test) until ANALYZE sees them.
_DEAD_KEYS = (
    select(_dead.c.key, func.min(_dead.c.id).label("first_id"))
    .where(_dead.c.dead_at.is_not(None), _dead.c.sent_at.is_(None))
    .group_by(_dead.c.key)
    .cte("dead_keys")
    .prefix_with("MATERIALIZED")
)

#: An outbox row waits behind a dead row of its key (keyless rows never do).
_BEHIND_DEAD = exists().where(_DEAD_KEYS.c.key == outbox.c.key, _DEAD_KEYS.c.first_id < outbox.c.id)

# The relay's statements, built once: each pass only binds its values.

#: up to ``:limit`` rows to publish, oldest first
_UNSENT = (
    select(outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.value, outbox.c.headers)
    .where(outbox.c.sent_at.is_(None), outbox.c.dead_at.is_(None), ~_BEHIND_DEAD)
    .order_by(outbox.c.id)
    .limit(bindparam("limit"))
)
#: the acknowledged rows ``:keep`` marked sent at ``:sent_at``
_MARK_SENT = (
    update(outbox)
    .where(outbox.c.id == any_(bindparam("keep", type_=ARRAY(BigInteger))))
    .values(sent_at=bindparam("sent_at"))
)
#: the same, and the rows ``:forget`` deleted, in one statement (a data-modifying CTE:
#: both, or neither)
_MARK_SENT_FORGET = _MARK_SENT.add_cte(
    delete(outbox)
    .where(outbox.c.id == any_(bindparam("forget", type_=ARRAY(BigInteger))))
    .returning(outbox.c.id)
    .cte("forgotten")
)
_UNSENT_SQL = driver.sql_of(_UNSENT)
_MARK_SENT_SQL = driver.sql_of(_MARK_SENT)
_MARK_SENT_FORGET_SQL = driver.sql_of(_MARK_SENT_FORGET)


#: Kafka's legal topic names
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def _waves(rows: Sequence[Any]) -> list[list[Any]]:
    """``rows`` (in id order) as waves: the n-th wave holds the n-th row of each key, so
    no row is in flight beside an earlier row of its key. Keyless rows have no order to
    keep: all in the first wave."""
    waves: list[list[Any]] = []
    seen: dict[bytes, int] = {}
    for r in rows:
        n = 0 if r.key is None else seen.get(r.key, 0)
        if r.key is not None:
            seen[r.key] = n + 1
        if n == len(waves):
            waves.append([])
        waves[n].append(r)
    return waves


def event_type_of(value: bytes) -> str:
    """The envelope's ``event_type`` of an outbox value, or ``?`` (a raw row)."""
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(value).get("event_type") or "?")
    return "?"


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
