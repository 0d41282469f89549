"""The console's "Stalled sagas" list judges each order by its status's deadline, the
monitor's own (``StallSettings`` → ``Deadlines``): a per-status override moves an order
in or out of the list as it moves the monitor's report.

Real PostgreSQL: a database at the orders schema with one order per case."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.monitor.settings import StallSettings
from services.orders.console.operator_lists import OperatorListReads
from services.runtime.settings import DatabaseSettings, GatewayClientSettings
from tests.conftest import Infra
from tests.integration.conftest import service_db
from tests.support.harness import query

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
_ORDER = (
    "INSERT INTO orders (order_id, customer_id, status, attempt, amount, currency, version,"
    " notified, created_at, updated_at) VALUES (%s, 'cus_1', %s, 1, 1000, 'EUR', 1, '[]',"
    " %s, %s) RETURNING 1"
)
#: order id -> (status, seconds unchanged)
ORDERS = {
    "ord_pending_120": ("PENDING_PAYMENT", 120),  # past its 60 s override
    "ord_pending_30": ("PENDING_PAYMENT", 30),
    "ord_authorized_100": ("PAYMENT_AUTHORIZED", 100),  # within the 900 s default
    "ord_authorized_1000": ("PAYMENT_AUTHORIZED", 1000),
    "ord_flagged_5": ("NEEDS_RECONCILIATION", 5),  # 1 s unless overridden
    "ord_paid_5000": ("PAID_CONFIRMED", 5000),  # final: never stalled
}


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with service_db(infra, "orders", "console_stalled") as found:
        for order_id, (status, age) in ORDERS.items():
            at = NOW - timedelta(seconds=age)
            query(found[1], _ORDER, order_id, status, at, at)
        yield found


async def _stalled(engine: AsyncEngine) -> list[str]:
    deadlines = StallSettings().deadlines()
    reads = OperatorListReads(
        engine, DatabaseSettings(), "127.0.0.1:9", GatewayClientSettings(), deadlines
    )
    return [r["order_id"] for r in await reads.stalled(NOW)]


async def test_the_stalled_list_uses_the_monitors_per_status_deadlines(
    db: tuple[AsyncEngine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = db
    monkeypatch.setenv("PAYSAGA_MONITOR_STALL_AFTER_PENDING_PAYMENT_S", "60")
    assert await _stalled(engine) == [
        "ord_authorized_1000",
        "ord_pending_120",
        "ord_flagged_5",
    ]
    monkeypatch.setenv("PAYSAGA_MONITOR_STALL_AFTER_NEEDS_RECONCILIATION_S", "10")
    monkeypatch.setenv("PAYSAGA_MONITOR_STALL_AFTER_S", "50")
    assert await _stalled(engine) == [
        "ord_authorized_1000",
        "ord_pending_120",
        "ord_authorized_100",
    ]
