"""The relay prunes inbox rows by the database's clock, the one that stamped their
``received_at``: a relay host whose clock runs ahead must not forget applied records
early (a redelivery would then be applied a second time).

Real PostgreSQL (a database of the refunds schema per test); Kafka is never reached —
the prune is driven directly."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import relay
from services.runtime.metrics import RuntimeMetrics
from services.runtime.relay import OutboxRelay, RelaySettings
from tests.conftest import Infra
from tests.integration.conftest import refunds_db
from tests.support.harness import query

pytestmark = pytest.mark.integration

SKEW = timedelta(days=6)


class _Ahead(datetime):
    @classmethod
    def now(cls, tz: object = None) -> _Ahead:
        return cls.fromtimestamp((datetime.now(UTC) + SKEW).timestamp(), UTC)


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with refunds_db(infra, "prune") as found:
        yield found


async def test_a_relay_whose_clock_runs_ahead_keeps_inbox_rows_within_retention(
    db: tuple[AsyncEngine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, conninfo = db
    query(conninfo, "INSERT INTO inbox (consumer_group, dedupe_key, received_at) VALUES"
          " ('g', 'two-days-old', now() - interval '2 days'),"
          " ('g', 'eight-days-old', now() - interval '8 days') RETURNING 1")  # fmt: skip
    r = OutboxRelay(
        service="refunds",
        engine=engine,
        conninfo=conninfo,
        bootstrap="127.0.0.1:9",
        metrics=RuntimeMetrics.create(CollectorRegistry()),
        settings=RelaySettings(inbox_retention_days=7),
    )
    monkeypatch.setattr(relay, "datetime", _Ahead)  # this host's clock: 6 days ahead
    await r._prune()
    kept = [k for (k,) in query(conninfo, "SELECT dedupe_key FROM inbox ORDER BY 1")]
    assert kept == ["two-days-old"]  # within the retention: still absorbs a redelivery
