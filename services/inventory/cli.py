"""``paysaga stock set|show`` (docs/contract.md §2.3).

``set`` publishes a ``StockLevelSet`` to ``catalog.stock.v1`` (key: the SKU), exactly as
the catalog does, so the inventory service stays the only writer of stock levels and
applies them in order per SKU. ``show`` reads the inventory database.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import typer
from aiokafka import AIOKafkaProducer
from rich.table import Table

from schemas.contract import StockLevelSet
from schemas.envelope import dump, new_envelope
from services.inventory import domain, store
from services.runtime.ids import new_event_id
from services.runtime.kafka import client_options
from services.runtime.service import make_engine
from services.runtime.settings import DatabaseSettings, KafkaSettings
from services.runtime.terminal import make_console
from services.runtime.topics import CATALOG_TOPIC

app = typer.Typer(no_args_is_help=True, help="Stock levels of the inventory service")
console = make_console()


async def publish_stock_level(bootstrap: str, sku: str, available: int) -> str:
    """Produce one StockLevelSet (acks=all, idempotent producer); returns its event id."""
    event_id = new_event_id()
    value = dump(
        new_envelope(
            "StockLevelSet",
            StockLevelSet(sku=sku, available=available),
            now=datetime.now(UTC),
            event_id=event_id,
        )
    )
    producer = AIOKafkaProducer(**client_options(bootstrap), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(CATALOG_TOPIC, value=value, key=sku.encode())
    finally:
        await producer.stop()
    return event_id


async def read_stock(url: str, sku: str | None = None) -> list[domain.StockLevel]:
    engine = make_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            return await store.list_stock(conn, sku)
    finally:
        await engine.dispose()


@app.command("set")
def stock_set(
    sku: str = typer.Argument(..., help="the SKU (1..64 chars)"),
    qty: int = typer.Argument(..., min=0, help="its whole quota: sellable + reserved + sold"),
) -> None:
    """Set the available quantity of SKU (through Kafka; applied by the inventory service)."""
    StockLevelSet(sku=sku, available=qty)  # fail fast on an invalid SKU
    levels = asyncio.run(read_stock(DatabaseSettings().url_for("inventory"), sku))
    refusal = domain.stock_level_rejection(levels[0] if levels else None, qty)
    if refusal:
        # the service would dead-letter it (and park later levels of this SKU behind it)
        console.print(f"[red]refused[/red]: {refusal}")
        raise typer.Exit(1)
    event_id = asyncio.run(publish_stock_level(KafkaSettings().kafka_bootstrap_servers, sku, qty))
    console.print(f"StockLevelSet {sku}={qty} published to {CATALOG_TOPIC} (event {event_id})")


@app.command("show")
def stock_show(sku: str | None = typer.Argument(None, help="one SKU (default: all)")) -> None:
    """Print available, reserved, sold and sellable per SKU."""
    levels = asyncio.run(read_stock(DatabaseSettings().url_for("inventory"), sku))
    if sku is not None and not levels:
        console.print(f"{sku}: never stocked (out of stock)")
        raise typer.Exit(1)
    table = Table("sku", "available", "reserved", "sold", "sellable")
    for level in levels:
        table.add_row(
            level.sku, str(level.available), str(level.reserved), str(level.sold),
            str(level.sellable),
        )  # fmt: skip
    console.print(table)
