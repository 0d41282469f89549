"""The capture service: confirms sales and captures authorizations.

``python -m services.capture.app``. Settings (environment, defaults):

- ``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS`` (127.0.0.1:9092); ``PAYSAGA_DATABASE_URL`` or
  ``PAYSAGA_CAPTURE_DATABASE_URL`` (database ``paysaga_capture``);
- ``PAYSAGA_CAPTURE_PORT`` (8083: /healthz, /readyz, /metrics), ``PAYSAGA_CAPTURE_HOST``;
- ``PAYSAGA_GATEWAY_URL`` (http://127.0.0.1:8090), ``PAYSAGA_GATEWAY_TIMEOUT_S`` (5);
- ``PAYSAGA_AUTHORIZATION_HOLD_S`` (518400 = 6 days): an authorization not captured
  by then is expired (``AuthorizationExpired``, then released and voided);
- worker: ``PAYSAGA_CAPTURE_MAX_ATTEMPTS`` (10 rounds), ``…_RETRY_BASE_S`` (1),
  ``…_RETRY_MAX_S`` (60), ``…_LEASE_S`` (120), ``…_POLL_S`` (0.5), ``…_CONCURRENCY`` (8).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from prometheus_client import CollectorRegistry
from pydantic_settings import SettingsConfigDict

from services.capture import domain, store
from services.capture.handlers import HANDLERS
from services.capture.worker import CaptureMetrics, CaptureWorker
from services.runtime.gateway_client import GatewayClient
from services.runtime.intents import WorkLoop
from services.runtime.messages import Route
from services.runtime.service import Service, libpq_conninfo, make_engine, run_service
from services.runtime.settings import DatabaseSettings, GatewayClientSettings, KafkaSettings

NAME = "capture"


class CaptureSettings(KafkaSettings, DatabaseSettings, GatewayClientSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    capture_port: int = 8083
    capture_host: str = "127.0.0.1"
    authorization_hold_s: float = 518_400.0
    capture_max_attempts: int = 10
    capture_retry_base_s: float = 1.0
    capture_retry_max_s: float = 60.0
    #: must exceed one round's worst case (look-up + capture, each up to the client's
    #: 4 attempts x PAYSAGA_GATEWAY_TIMEOUT_S plus backoff)
    capture_lease_s: float = 120.0
    capture_poll_s: float = 0.5
    capture_concurrency: int = 8

    def policy(self) -> domain.CapturePolicy:
        return domain.CapturePolicy(
            hold=timedelta(seconds=self.authorization_hold_s),
            retry=domain.RetryPolicy(
                self.capture_max_attempts, self.capture_retry_base_s, self.capture_retry_max_s
            ),
        )


def build(settings: CaptureSettings) -> Service:
    url = settings.url_for(NAME)
    engine = make_engine(url, pool_size=settings.capture_concurrency + 2)
    registry = CollectorRegistry()
    metrics = CaptureMetrics.create(registry)

    async def capture_worker(stop: asyncio.Event) -> None:
        async with GatewayClient(
            settings.gateway_url, timeout_s=settings.gateway_timeout_s
        ) as gateway:
            worker = CaptureWorker(
                engine, gateway, settings.policy(), metrics,
                lease=timedelta(seconds=settings.capture_lease_s),
                batch=settings.capture_concurrency,
            )  # fmt: skip
            loop = WorkLoop(
                NAME, libpq_conninfo(url), store.CHANNEL, worker.tick, settings.capture_poll_s
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
        http_port=settings.capture_port,
        http_host=settings.capture_host,
        workers=[capture_worker],
    )


def main() -> None:
    run_service(lambda: build(CaptureSettings()))


if __name__ == "__main__":
    main()
