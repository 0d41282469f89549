"""What the console reads from: every service's database (read-only transactions, at the
URLs of ``DatabaseSettings.url_for``, the same settings every service and ``paysaga
reconcile`` use), Kafka's dead-letter topics and the gateway. The page reads
(``reads.py``) build on ``Sources``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.monitor.domain import Deadlines
from services.runtime.service import make_engine
from services.runtime.settings import SERVICES, DatabaseSettings, GatewayClientSettings

Row = dict[str, Any]


class Sources:
    """``orders`` is the service's own engine; the other databases are opened lazily,
    one small pool each."""

    def __init__(
        self,
        orders: AsyncEngine,
        db: DatabaseSettings,
        bootstrap: str,
        gateway: GatewayClientSettings,
        deadlines: Deadlines,
    ) -> None:
        self._engines: dict[str, AsyncEngine] = {"orders": orders}
        self._db = db
        self._bootstrap = bootstrap
        self._gateway = gateway
        self.deadlines = deadlines

    @contextlib.asynccontextmanager
    async def _read(self, service: str) -> AsyncIterator[AsyncConnection]:
        engine = self._engines.get(service)
        if engine is None:
            engine = self._engines[service] = make_engine(
                self._db.url_for(service), pool_size=1, pre_ping=True
            )
        async with engine.connect() as conn:
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            yield conn

    async def _all(self, service: str, sql: str, **params: Any) -> list[Row]:
        async with self._read(service) as conn:
            return [dict(r) for r in (await conn.execute(text(sql), params)).mappings()]

    async def _all_services(self, sql: str, **params: Any) -> list[Row]:
        """``sql`` in every service's database, each row with its ``service``."""
        out: list[Row] = []
        for service in SERVICES:
            out += [{"service": service, **r} for r in await self._all(service, sql, **params)]
        return out

    async def close(self) -> None:
        for name, engine in self._engines.items():
            if name != "orders":
                await engine.dispose()
