"""Wiring a gateway-intent service: its consumer and its worker rounds
(``services.runtime.intents``). ``intent_service`` wires capture and refunds whole;
payments, whose consumer does more, adds ``intent_rounds`` to its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.gateway_client import GatewayClient
from services.runtime.intents.worker import IntentWorker
from services.runtime.messages import Handlers, routes_of
from services.runtime.metrics import GatewayMetrics
from services.runtime.retry import RetryPolicy
from services.runtime.service import Service, Worker, make_engine
from services.runtime.settings import (
    DatabaseSettings,
    GatewayClientSettings,
    KafkaSettings,
    libpq_conninfo,
)
from services.runtime.wakeup import WorkLoop

PolicyT = TypeVar("PolicyT")
MetricsT = TypeVar("MetricsT")


class IntentServiceSettings(BaseSettings):
    """A gateway-intent service's own settings, ``PAYSAGA_<SERVICE>_…`` (a subclass sets
    the prefix and the port)."""

    port: int
    host: str = "127.0.0.1"
    #: worker rounds before the alarm (→ NEEDS_RECONCILIATION); a final answer of the
    #: gateway ends them sooner, an unknown outcome is looked up after them
    max_attempts: int = 10
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    #: after the rounds: look-ups at most this far apart until the gateway settles it
    stalled_retry_max_s: float = 900.0
    #: must exceed one round's worst case (look-up + call, each up to the gateway
    #: client's PAYSAGA_GATEWAY_MAX_ATTEMPTS x PAYSAGA_GATEWAY_TIMEOUT_S plus backoff)
    lease_s: float = 120.0
    poll_s: float = 0.5
    #: gateway rounds in flight at most
    concurrency: int = Field(8, ge=1)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            self.max_attempts, self.retry_base_s, self.retry_max_s, self.stalled_retry_max_s
        )


class SharedSettings(KafkaSettings, DatabaseSettings, GatewayClientSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")


def intent_service(
    name: str,
    own: IntentServiceSettings,
    shared: SharedSettings,
    handlers: Handlers,
    worker: type[IntentWorker[Any, Any, PolicyT, MetricsT]],
    policy: PolicyT,
    metrics: Callable[[CollectorRegistry], MetricsT],
) -> Service:
    """Wire a gateway-intent service: its consumer (``handlers`` record intents in
    transaction A and NOTIFY the worker's channel) and its ``worker`` rounds."""
    url = shared.url_for(name)
    # the rounds in flight and the claim keep a connection each (``KeptConnections``),
    # the consumer's lanes and the relay one each: the rarer paths need some left
    engine = make_engine(url, pool_size=own.concurrency + 4)
    registry = CollectorRegistry()
    rounds = intent_rounds(
        name, url, engine, shared, registry, worker, policy, metrics(registry),
        lease_s=own.lease_s, concurrency=own.concurrency, poll_s=own.poll_s,
    )  # fmt: skip
    return Service(
        name=name,
        group=f"paysaga.{name}",
        engine=engine,
        database_url=url,
        bootstrap=shared.kafka_bootstrap_servers,
        routes=routes_of(handlers),
        registry=registry,
        http_port=own.port,
        http_host=own.host,
        workers=[rounds],
    )


def intent_rounds(
    name: str,
    url: str,
    engine: AsyncEngine,
    gateway: GatewayClientSettings,
    registry: CollectorRegistry,
    worker: type[IntentWorker[Any, Any, PolicyT, MetricsT]],
    policy: PolicyT,
    metrics: MetricsT,
    *,
    lease_s: float,
    concurrency: int,
    poll_s: float = 0.5,
) -> Worker:
    """A service's worker task of ``worker`` rounds: one gateway client, and a
    ``WorkLoop`` woken on the worker's channel, with up to ``concurrency`` rounds in
    flight, each claim leased for ``lease_s``; with nothing due it waits ``poll_s`` at
    the most for a notification."""
    gateway_metrics = GatewayMetrics.create(registry)

    async def work(stop: asyncio.Event) -> None:
        async with GatewayClient(
            gateway.gateway_url,
            timeout_s=gateway.gateway_timeout_s,
            max_attempts=gateway.gateway_max_attempts,
            metrics=gateway_metrics,
        ) as client:
            rounds = worker(
                engine, client, policy, metrics,
                lease=timedelta(seconds=lease_s), batch=concurrency,
            )  # fmt: skip
            loop = WorkLoop(
                name, libpq_conninfo(url), worker.channel, rounds.tick, poll_s, drain=rounds.drain
            )
            async with rounds.kept.while_running():
                await loop.run(stop)

    return work
