"""payments: wiring and ``main()`` (``python -m services.payments.app``)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

from prometheus_client import CollectorRegistry
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.payments import unmatched_store
from services.payments.handlers import PaymentsHandlers
from services.payments.metrics import Metrics
from services.payments.request_worker import RequestMetrics, RequestWorker
from services.runtime.intents.service import intent_rounds
from services.runtime.messages import Record, Route, routes_of
from services.runtime.periodic import every
from services.runtime.retry import RetryPolicy
from services.runtime.service import Service, make_engine, run_service
from services.runtime.settings import (
    DatabaseSettings,
    GatewayClientSettings,
    GatewaySecrets,
    KafkaSettings,
)
from services.runtime.topics import CONFIRMATIONS_TOPIC


class PaymentsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    payments_host: str = "127.0.0.1"
    payments_port: int = 8081
    #: |signature t - record time| allowed, both directions (docs/contract.md §2.2)
    signature_tolerance_s: int = 300
    #: how long an unmatched payment is matched automatically when its order arrives
    unmatched_window_s: int = 86_400
    #: how often paysaga_unmatched_payments_open is read from the store
    payments_unmatched_gauge_interval_s: float = 10.0
    #: payment requests (docs/contract.md §3.7): worker rounds before NEEDS_RECONCILIATION,
    #: their backoff, the lease of a claimed request, concurrent requests
    payments_request_max_attempts: int = 10
    payments_request_retry_base_s: float = 1.0
    payments_request_retry_max_s: float = 60.0
    payments_request_lease_s: float = 120.0
    payments_request_concurrency: int = Field(8, ge=1)


def confirmation_dedupe_key(rec: Record) -> str:
    """Inbox key of a raw webhook record: the gateway and a digest of the exact bytes and
    of the signature header. Known before anything parses the body; a gateway retry
    (same bytes, same signature) is absorbed here. The same body with a new signature
    (resent after a rejected delivery, e.g. during a secret rotation) is a new delivery:
    it is verified and judged like any other, and a real duplicate is still caught by
    the semantic rules (event id, transaction + type) applied after verification."""
    gateway = (rec.header("paysaga-gateway") or b"").decode("utf-8", "replace")
    digest = hashlib.sha256(rec.value)
    digest.update(b"\x00" + (rec.header("paysaga-signature") or b""))
    return f"webhook:{gateway}:{digest.hexdigest()}"


def build() -> Service:
    settings = PaymentsSettings()
    secrets = GatewaySecrets().gateway_secrets  # refuses to start without them
    url = DatabaseSettings().url_for("payments")
    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    h = PaymentsHandlers(
        secrets=secrets,
        tolerance_s=settings.signature_tolerance_s,
        unmatched_window=timedelta(seconds=settings.unmatched_window_s),
        metrics=metrics,
    )
    engine = make_engine(url, pool_size=settings.payments_request_concurrency + 5)

    async def count_unmatched() -> None:
        async with engine.connect() as conn:
            counts = await asyncio.wait_for(unmatched_store.count_unmatched_open(conn), 5)
        for state, n in counts.items():
            metrics.unmatched_open.labels(state).set(n)

    policy = RetryPolicy(
        settings.payments_request_max_attempts,
        settings.payments_request_retry_base_s,
        settings.payments_request_retry_max_s,
    )
    # the payment request worker (docs/contract.md §3.7): payments owns payment attempts
    request_payments = intent_rounds(
        "payments", url, engine, GatewayClientSettings(), registry,
        RequestWorker, policy, RequestMetrics.create(registry),
        lease_s=settings.payments_request_lease_s,
        concurrency=settings.payments_request_concurrency,
    )  # fmt: skip

    # the gateway's webhook bodies are not envelopes: a raw route, deduped by digest
    confirmations = Route(
        CONFIRMATIONS_TOPIC, raw_handler=h.on_confirmation, dedupe_key=confirmation_dedupe_key
    )
    routes = [*routes_of(h.handlers()), confirmations]
    return Service(
        name="payments",
        group="paysaga.payments",
        engine=engine,
        database_url=url,
        bootstrap=KafkaSettings().kafka_bootstrap_servers,
        routes=routes,
        registry=registry,
        http_port=settings.payments_port,
        http_host=settings.payments_host,
        on_dead_letter=h.flag_dead_letter,
        prepare_batch=h.prepare,
        workers=[
            request_payments,
            every(
                "unmatched payments gauge",
                settings.payments_unmatched_gauge_interval_s,
                count_unmatched,
            ),
        ],
    )


def main() -> None:
    run_service(build)


if __name__ == "__main__":
    main()
