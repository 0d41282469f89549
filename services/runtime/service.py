"""The service shell: one process = consumer + outbox relay + background workers +
HTTP (``/healthz``, ``/readyz``, ``/metrics`` and the service's own routes).

SIGTERM/SIGINT set one stop event: the consumer finishes its in-flight batch, commits
and leaves the group; the relay finishes its publish pass; the HTTP server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from datetime import timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.runtime.blocking import DeadLetterHook
from services.runtime.consumer import ConsumerRuntime, RuntimeSettings
from services.runtime.dlq import DeadLetterProducer
from services.runtime.logs import configure_logging
from services.runtime.messages import BatchHook, Route
from services.runtime.metrics import RuntimeMetrics
from services.runtime.probes import add_probes
from services.runtime.relay import OutboxRelay, RelaySettings
from services.runtime.settings import libpq_conninfo

__all__ = ["Service", "configure_logging", "make_engine", "run_service"]

log = logging.getLogger("paysaga.service")

Worker = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def make_engine(url: str, pool_size: int = 5, *, pre_ping: bool = False) -> AsyncEngine:
    """A service's engine. ``pre_ping``: test each connection on checkout — for what
    answers people (the status API, the console). The consumer, the relay and the
    workers retry a transient failure instead: a connection that died (a database
    restart) fails one transaction, SQLAlchemy then renews the pool, and the retry gets
    a new one — where a ping on every checkout costs a round trip per transaction. A
    failed statement's error never shows its parameters."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=5,
        pool_pre_ping=pre_ping,
        pool_timeout=10,
        connect_args={"connect_timeout": 5},
        # a failed statement's error never carries its parameters: an outbox row's value
        # may hold a payment's client secret (docs/contract.md §3.7), and errors are logged
        hide_parameters=True,
    )


@dataclasses.dataclass
class Service:
    """A wired service. ``build(settings)`` functions of each service construct one."""

    name: str
    group: str
    engine: AsyncEngine
    database_url: str
    bootstrap: str
    routes: Sequence[Route]
    registry: CollectorRegistry
    http_port: int
    http_host: str = "127.0.0.1"
    on_dead_letter: DeadLetterHook | None = None
    #: reads what a batch's records are about, before its handlers (``BatchHook``)
    prepare_batch: BatchHook | None = None
    workers: Sequence[Worker] = ()
    app: FastAPI | None = None
    runtime_settings: RuntimeSettings = dataclasses.field(default_factory=RuntimeSettings)
    relay_settings: RelaySettings = dataclasses.field(default_factory=RelaySettings)
    metrics: RuntimeMetrics | None = None
    #: partition batches applied side by side (``consumer.lanes_of``); None: the
    #: setting (``PAYSAGA_PARTITION_LANES``). 1 for a service whose records of different
    #: orders share rows (inventory's stock: side by side they would deadlock)
    partition_lanes: int | None = None

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RuntimeMetrics.create(self.registry)
        self.consumer: ConsumerRuntime | None = None
        self.relay: OutboxRelay | None = None

    def http_app(self) -> FastAPI:
        app = self.app or FastAPI(title=f"paysaga {self.name}")

        async def readiness() -> tuple[dict[str, bool], list[str]]:
            checks = await self.readiness()
            reasons = self.consumer.position_problems() if self.consumer is not None else []
            return checks, reasons

        add_probes(app, self.name, self.registry, readiness, in_schema=self.app is None)
        return app

    async def readiness(self) -> dict[str, bool]:
        """Database reachable, the consumer progressing — records waiting while no
        stored position advanced for ``stall_after_s`` (a stuck partition, an endless
        retry, aiokafka#1154 after a broker restart) turn this red — and its positions
        fitting the log: red while a partition whose stored position was beyond the log
        end re-reads it, or one that had no stored position but a Kafka-committed offset
        catches up (the reasons are in ``/readyz``'s ``reasons``)."""
        db = True
        try:
            async with self.engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), 3)
        except Exception:
            db = False
        consumer = self.consumer
        return {
            "database": db,
            "kafka": consumer is not None and consumer.ready(),
            "positions": consumer is not None and not consumer.position_problems(),
        }

    async def run(self, stop: asyncio.Event) -> None:
        assert self.metrics is not None
        producer = DeadLetterProducer(self.bootstrap, f"paysaga-{self.name}")
        await producer.start()
        self.consumer = ConsumerRuntime(
            service=self.name,
            group=self.group,
            routes=self.routes,
            engine=self.engine,
            bootstrap=self.bootstrap,
            producer=producer,
            metrics=self.metrics,
            settings=self.runtime_settings,
            on_dead_letter=self.on_dead_letter,
            prepare_batch=self.prepare_batch,
            inbox_retention=timedelta(days=self.relay_settings.inbox_retention_days),
            lanes=self.partition_lanes or self.runtime_settings.partition_lanes,
        )
        self.relay = OutboxRelay(
            service=self.name,
            engine=self.engine,
            conninfo=libpq_conninfo(self.database_url),
            bootstrap=self.bootstrap,
            metrics=self.metrics,
            settings=self.relay_settings,
        )
        server = _Server(
            uvicorn.Config(
                self.http_app(),
                host=self.http_host,
                port=self.http_port,
                log_level="warning",
                log_config=None,  # its lines through the one setup (services.runtime.logs)
                lifespan="off",
            )
        )
        tasks = [
            asyncio.create_task(self.consumer.run(stop), name="consumer"),
            asyncio.create_task(self.relay.run(stop), name="relay"),
            asyncio.create_task(server.serve(), name="http"),
            *(asyncio.create_task(w(stop), name=f"worker{i}") for i, w in enumerate(self.workers)),
        ]
        try:
            # a task that dies takes the process down (a supervisor restarts it);
            # limping on without a consumer or relay would hide the failure
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    log.error("%s task %s failed", self.name, t.get_name(), exc_info=t.exception())
            stop.set()
            server.should_exit = True
            await asyncio.wait(tasks, timeout=30)
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception()]
            if failed:
                raise RuntimeError(f"{self.name}: {[t.get_name() for t in failed]} failed")
        finally:
            for t in tasks:
                t.cancel()
            await producer.stop()
            await self.engine.dispose()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service's stop event rules."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def run_service(build: Callable[[], Service]) -> None:
    """``main()`` of every service: build, then run until SIGTERM/SIGINT."""
    configure_logging()  # named after the module it runs (services.<name>.app)

    async def _main() -> None:
        service = build()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)

    asyncio.run(_main())
