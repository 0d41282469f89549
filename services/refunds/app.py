"""The refunds service: voids authorizations and refunds captured sales that the saga
cannot fulfil.

``python -m services.refunds.app``. Settings (environment, defaults):

- ``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS`` (127.0.0.1:9092); ``PAYSAGA_DATABASE_URL`` or
  ``PAYSAGA_REFUNDS_DATABASE_URL`` (database ``paysaga_refunds``);
- ``PAYSAGA_REFUNDS_PORT`` (8084: /healthz, /readyz, /metrics), ``PAYSAGA_REFUNDS_HOST``;
- ``PAYSAGA_GATEWAY_URL`` (http://127.0.0.1:8090), ``PAYSAGA_GATEWAY_TIMEOUT_S`` (5);
- worker: ``PAYSAGA_REFUNDS_MAX_ATTEMPTS`` (10 rounds), ``…_RETRY_BASE_S`` (1),
  ``…_RETRY_MAX_S`` (60), ``…_LEASE_S`` (120), ``…_POLL_S`` (0.5), ``…_CONCURRENCY`` (8).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from prometheus_client import CollectorRegistry
from pydantic_settings import SettingsConfigDict

from services.refunds import domain, store
from services.refunds.handlers import HANDLERS
from services.refunds.worker import RefundsMetrics, RefundsWorker
from services.runtime.gateway_client import GatewayClient
from services.runtime.intents import WorkLoop
from services.runtime.messages import Route
from services.runtime.service import Service, libpq_conninfo, make_engine, run_service
from services.runtime.settings import DatabaseSettings, GatewayClientSettings, KafkaSettings

NAME = "refunds"


class RefundsSettings(KafkaSettings, DatabaseSettings, GatewayClientSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    refunds_port: int = 8084
    refunds_host: str = "127.0.0.1"
    refunds_max_attempts: int = 10
    refunds_retry_base_s: float = 1.0
    refunds_retry_max_s: float = 60.0
    #: must exceed one round's worst case (look-up + call, each up to the client's
    #: 4 attempts x PAYSAGA_GATEWAY_TIMEOUT_S plus backoff)
    refunds_lease_s: float = 120.0
    refunds_poll_s: float = 0.5
    refunds_concurrency: int = 8


def build(settings: RefundsSettings) -> Service:
    url = settings.url_for(NAME)
    engine = make_engine(url, pool_size=settings.refunds_concurrency + 2)
    registry = CollectorRegistry()
    metrics = RefundsMetrics.create(registry)
    policy = domain.RetryPolicy(
        settings.refunds_max_attempts, settings.refunds_retry_base_s, settings.refunds_retry_max_s
    )

    async def refunds_worker(stop: asyncio.Event) -> None:
        async with GatewayClient(
            settings.gateway_url, timeout_s=settings.gateway_timeout_s
        ) as gateway:
            worker = RefundsWorker(
                engine, gateway, policy, metrics,
                lease=timedelta(seconds=settings.refunds_lease_s),
                batch=settings.refunds_concurrency,
            )  # fmt: skip
            loop = WorkLoop(
                NAME, libpq_conninfo(url), store.CHANNEL, worker.tick, settings.refunds_poll_s
            )
            await loop.run(stop)

    return Service(
        name=NAME,
        group=f"paysaga.{NAME}",
        engine=engine,
        database_url=url,
        bootstrap=settings.kafka_bootstrap_servers,
        routes=[Route(topic, handlers=dict(handlers)) for topic, handlers in HANDLERS.items()],
        registry=registry,
        http_port=settings.refunds_port,
        http_host=settings.refunds_host,
        workers=[refunds_worker],
    )


def main() -> None:
    run_service(lambda: build(RefundsSettings()))


if __name__ == "__main__":
    main()
