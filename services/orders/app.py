"""Wiring of the orders service: consumer group ``paysaga.orders`` over the four saga
topics and ``audit.events.v1``, its outbox relay, and the status API.

``python -m services.orders.app`` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict
from sqlalchemy.ext.asyncio import AsyncEngine

from services import reconcile
from services.monitor.settings import StallSettings
from services.orders import store
from services.orders.api import create_api
from services.orders.console import routes as console
from services.orders.console.actions import Actions, OperatorToken
from services.orders.console.reads import ConsoleReads
from services.orders.handlers import OrdersMetrics, Projection
from services.runtime.messages import routes_of
from services.runtime.periodic import every
from services.runtime.service import Service, Worker, make_engine, run_service
from services.runtime.settings import DatabaseSettings, GatewayClientSettings, KafkaSettings

GROUP = "paysaga.orders"

log = logging.getLogger("paysaga.orders")


class OrdersSettings(KafkaSettings, DatabaseSettings, GatewayClientSettings, StallSettings):
    """``PAYSAGA_*`` settings; the database is ``PAYSAGA_ORDERS_DATABASE_URL``, else
    ``PAYSAGA_DATABASE_URL`` + ``/paysaga_orders``."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    orders_host: str = "127.0.0.1"
    orders_port: int = 8080
    orders_held_gauge_interval_s: float = 10.0
    #: ``name:secret`` of the operator allowed to act in the console; unset: read-only
    console_token: SecretStr | None = None
    #: the periodic reconcile (paysaga_reconcile_violations): 0 turns it off; the
    #: gateway is asked only with reconcile_gateway
    reconcile_interval_s: float = 300.0
    reconcile_gateway: bool = False


def held_gauge(engine: AsyncEngine, metrics: OrdersMetrics, interval_s: float) -> Worker:
    """Refresh ``paysaga_orders_held_events`` from the table: the count across every
    process of the group, and only of committed holds. A count stuck above zero means
    a cause that never arrived (e.g. dead-lettered upstream)."""

    async def refresh() -> None:
        async with engine.connect() as conn:
            metrics.early_events.set(await asyncio.wait_for(store.count_early(conn), 5))

    return every("held events gauge", interval_s, refresh)


def reconcile_gauge(metrics: OrdersMetrics, interval_s: float, gateway_url: str | None) -> Worker:
    """``paysaga reconcile``'s checks every ``interval_s`` (the stores; the gateway too
    when ``gateway_url``), counted by rule in ``paysaga_reconcile_violations``; a rule
    seen before and clean now is set to 0."""
    seen: set[str] = set()

    async def run_checks() -> None:
        try:
            found = await asyncio.to_thread(reconcile.check, gateway_url)
        except Exception:
            metrics.reconcile_runs.labels("failed").inc()
            raise
        counts = collections.Counter(v.rule for v in found)
        seen.update(counts)
        for kind in seen:
            metrics.reconcile_violations.labels(kind).set(counts.get(kind, 0))
        metrics.reconcile_runs.labels("ok").inc()

    return every("periodic reconcile", interval_s, run_checks)


def build(settings: OrdersSettings) -> Service:
    url = settings.url_for("orders")
    engine = make_engine(url)
    # what answers people: its own pool, each connection tested on checkout
    api_engine = make_engine(url, pre_ping=True)
    registry = CollectorRegistry()
    metrics = OrdersMetrics.create(registry)
    token = settings.console_token
    reads = ConsoleReads(
        api_engine,
        settings,
        settings.kafka_bootstrap_servers,
        settings,
        settings.deadlines(),
    )
    actions = Actions(api_engine, settings.kafka_bootstrap_servers)
    operator = OperatorToken.parse(token.get_secret_value() if token else None)
    workers = [held_gauge(engine, metrics, settings.orders_held_gauge_interval_s)]
    if settings.reconcile_interval_s > 0:
        gateway_url = settings.gateway_url if settings.reconcile_gateway else None
        workers.append(reconcile_gauge(metrics, settings.reconcile_interval_s, gateway_url))
    projection = Projection(metrics)
    return Service(
        name="orders",
        group=GROUP,
        engine=engine,
        database_url=url,
        bootstrap=settings.kafka_bootstrap_servers,
        routes=routes_of(projection.handlers()),
        prepare_batch=projection.prepare,
        registry=registry,
        http_port=settings.orders_port,
        http_host=settings.orders_host,
        app=create_api(api_engine, lambda app: console.install(app, reads, actions, operator)),
        workers=workers,
    )


def main() -> None:
    run_service(lambda: build(OrdersSettings()))


if __name__ == "__main__":
    main()
