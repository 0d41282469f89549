"""The outbox relay: publishes a service's outbox rows to Kafka, in order.

Guarantees:

* One active relay per service database: the relay holds a session-level PostgreSQL
  advisory lock on its own connection. A second instance waits (retrying the lock) and
  takes over as soon as the first one's connection is gone — e.g. its process died.
* Rows are published in id order through one idempotent producer (acks=all), each with
  its stored key (the order id), so one order's events keep their order on a partition.
  Rows are marked sent only after Kafka acknowledged them. A crash between the two
  re-publishes those rows; consumers' inboxes absorb the duplicates.
* Woken by LISTEN/NOTIFY when a handler commits outbox rows; a slow poll is the
  fallback when a notification is missed.
* Sent rows and inbox rows past their retention are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import zlib
from datetime import UTC, datetime, timedelta

import psycopg
from aiokafka import AIOKafkaProducer
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.errors import said
from services.runtime.faults import fault_point
from services.runtime.metrics import RuntimeMetrics
from services.runtime.outbox import OUTBOX_CHANNEL
from services.runtime.tables import inbox, outbox

log = logging.getLogger("paysaga.relay")


class RelaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_RELAY_", extra="ignore")

    batch: int = 500
    poll_s: float = 2.0
    lock_retry_s: float = 1.0
    outbox_retention_h: float = 24.0
    #: at least the longest redelivery window (Kafka retention of the saga topics)
    inbox_retention_days: float = 7.0
    prune_every_s: float = 300.0


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
            await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=f"paysaga-{self.service}-relay",
                enable_idempotence=True,
                acks="all",
                linger_ms=2,
                request_timeout_ms=15000,
            )
            await producer.start()
            try:
                last_prune = -math.inf  # prune at once on taking the lead, then every prune_every_s
                while not stop.is_set():
                    while await self._publish_batch(producer):
                        pass
                    if time.monotonic() - last_prune > self.settings.prune_every_s:
                        await self._prune()
                        last_prune = time.monotonic()
                    await self._wait_for_notify(conn, stop)
            finally:
                self.active = False
                await producer.stop()

    async def _publish_batch(self, producer: AIOKafkaProducer) -> bool:
        """Publish up to ``batch`` unsent rows; True if there may be more."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        outbox.c.id, outbox.c.topic, outbox.c.key, outbox.c.value, outbox.c.headers
                    )
                    .where(outbox.c.sent_at.is_(None))
                    .order_by(outbox.c.id)
                    .limit(self.settings.batch)
                )
            ).all()
        if not rows:
            self.metrics.outbox_backlog.labels(self.service).set(0)
            self.metrics.outbox_oldest_age.labels(self.service).set(0)
            return False
        # send in id order without waiting for each ack: the idempotent producer keeps
        # the order per partition; we wait for all acks before marking them sent.
        futures = [
            await producer.send(
                r.topic, value=r.value, key=r.key, headers=[(k, v.encode()) for k, v in r.headers]
            )
            for r in rows
        ]
        await asyncio.gather(*futures)
        fault_point("relay_after_send_before_mark")
        async with self.engine.begin() as conn:
            await conn.execute(
                update(outbox)
                .where(outbox.c.id.in_([r.id for r in rows]))
                .values(sent_at=datetime.now(UTC))
            )
        self.metrics.outbox_published.labels(self.service).inc(len(rows))
        await self._update_backlog()
        return len(rows) == self.settings.batch

    async def _update_backlog(self) -> None:
        async with self.engine.connect() as conn:
            count, oldest = (
                await conn.execute(
                    select(func.count(), func.min(outbox.c.created_at)).where(
                        outbox.c.sent_at.is_(None)
                    )
                )
            ).one()
        self.metrics.outbox_backlog.labels(self.service).set(count)
        age = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0
        self.metrics.outbox_oldest_age.labels(self.service).set(age)

    async def _wait_for_notify(
        self, conn: psycopg.AsyncConnection[object], stop: asyncio.Event
    ) -> None:
        with contextlib.suppress(TimeoutError):
            async for _ in conn.notifies(timeout=self.settings.poll_s, stop_after=1):
                break
        # drain notifications that piled up meanwhile: one publish pass covers them all
        with contextlib.suppress(TimeoutError):
            async for _ in conn.notifies(timeout=0.001):
                pass

    async def _prune(self) -> None:
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(outbox).where(
                    outbox.c.sent_at < now - timedelta(hours=self.settings.outbox_retention_h)
                )
            )
            await conn.execute(
                delete(inbox).where(
                    inbox.c.received_at < now - timedelta(days=self.settings.inbox_retention_days)
                )
            )


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
