"""The idempotent producer that starts afresh after a failed send: the bridge's and
the dead-letter producer's (the relay restarts its own the same way, per wave).

Why: aiokafka does not reset an idempotent producer's sequence numbers when a batch
fails for good (it expired while the broker was away). The broker then refuses every
later batch of that partition with ``OutOfOrderSequenceNumber``, for as long as the
process lives — seen after a broker restart: the bridge answered 503 to every webhook
of two partitions until it was restarted. A new producer has a new producer id, so the
next send is accepted. The record whose send failed is its caller's to retry: its
outcome was an error, never a silent drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from services.runtime.kafka import client_options
from services.runtime.retry import backoff_s

log = logging.getLogger("paysaga.producer")


class RenewingProducer:
    """An idempotent ``acks=all`` producer; after a failed send, the next send goes
    through a new one (started in the background, retried until the cluster answers)."""

    def __init__(self, bootstrap: str, client_id: str, request_timeout_ms: int) -> None:
        self.bootstrap, self.client_id = bootstrap, client_id
        self.request_timeout_ms = request_timeout_ms
        self._producer: AIOKafkaProducer | None = None
        self._renewing: asyncio.Task[None] | None = None
        #: how many producers this one has started (the first, then one per renewal)
        self.generation = 0

    def _new(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **client_options(self.bootstrap),
            client_id=self.client_id,
            enable_idempotence=True,
            acks="all",
            # batches still unsent when a request gives up expire instead of lingering
            request_timeout_ms=self.request_timeout_ms,
        )

    @property
    def connected(self) -> AIOKafkaProducer | None:
        """The producer sends go through now; None while (re)connecting."""
        return self._producer

    async def start(self) -> None:
        """One attempt; raises KafkaError or OSError if the cluster does not answer."""
        producer = self._new()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self.generation += 1

    async def connect(self) -> None:
        """Start, retried with backoff until the cluster answers."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.start()
            except (KafkaError, OSError) as exc:
                delay = backoff_s(attempt, 0.5, 10.0, jitter=0.0, fixed=1.0)
                log.warning(
                    "%s: kafka unreachable (%r); retrying in %.1f s", self.client_id, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            log.info("%s connected to kafka at %s", self.client_id, self.bootstrap)
            return

    async def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
        if self._producer is not None:
            await self._producer.stop()  # flushes what is in flight
            self._producer = None

    async def send_and_wait(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        timeout_s: float | None = None,
    ) -> Any:
        """Append one record and wait for its acknowledgement (RecordMetadata). Raises
        KafkaError (KafkaConnectionError while reconnecting) or TimeoutError; after any
        failure the producer is renewed."""
        producer = self._producer
        if producer is None:
            raise KafkaConnectionError(f"{self.client_id}: producer not connected")
        try:
            sent = producer.send_and_wait(topic, value=value, key=key, headers=headers)
            return await (asyncio.wait_for(sent, timeout_s) if timeout_s else sent)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._renew(producer, exc)
            raise

    def _renew(self, failed: AIOKafkaProducer, exc: BaseException) -> None:
        if self._producer is not failed:  # another send renewed it already
            return
        log.warning("%s: a send failed (%r): starting a new producer", self.client_id, exc)
        self._producer = None
        self._renewing = asyncio.create_task(self._replace(failed))

    async def _replace(self, failed: AIOKafkaProducer) -> None:
        # the old one's batches are failed, or flushed (at least once: the caller saw an
        # error and retries; the consumer of the topic dedupes)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(failed.stop(), self.request_timeout_ms / 1000)
        await self.connect()
