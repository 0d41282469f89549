"""The inventory service: stock levels, reservations, commits and releases.

``python -m services.inventory.app``. Settings (environment): ``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS``
(127.0.0.1:9092), ``PAYSAGA_DATABASE_URL`` or ``PAYSAGA_INVENTORY_DATABASE_URL`` (database
``paysaga_inventory``), ``PAYSAGA_INVENTORY_PORT`` (8082: /healthz, /readyz, /metrics).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from pydantic_settings import SettingsConfigDict

from services.inventory.handlers import HANDLERS
from services.runtime.messages import routes_of
from services.runtime.service import Service, make_engine, run_service
from services.runtime.settings import DatabaseSettings, KafkaSettings

NAME = "inventory"


class InventorySettings(KafkaSettings, DatabaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    inventory_port: int = 8082
    inventory_host: str = "127.0.0.1"


def build(settings: InventorySettings) -> Service:
    url = settings.url_for(NAME)
    return Service(
        name=NAME,
        group=f"paysaga.{NAME}",
        engine=make_engine(url),
        database_url=url,
        bootstrap=settings.kafka_bootstrap_servers,
        routes=routes_of(HANDLERS),
        registry=CollectorRegistry(),
        http_port=settings.inventory_port,
        http_host=settings.inventory_host,
        partition_lanes=1,  # orders share stock rows: one batch at a time
    )


def main() -> None:
    run_service(lambda: build(InventorySettings()))


if __name__ == "__main__":
    main()
