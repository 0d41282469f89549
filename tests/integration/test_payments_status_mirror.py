"""Payments mirrors each status orders publishes in one statement when the status can
change nothing else (``store.record_saga_status``), and leaves the rest — an unknown
order, a stale version, a pending retry — to the decision on the loaded order.

Real PostgreSQL: a database at the payments schema."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.payments import store
from tests.conftest import Infra
from tests.integration.conftest import service_db
from tests.support.harness import query
from tests.support.payments import make_order

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with service_db(infra, "payments", "mirror") as found:
        yield found


async def test_a_status_is_recorded_in_one_statement_only_where_nothing_else_is_to_decide(
    db: tuple[AsyncEngine, str],
) -> None:
    engine, conninfo = db
    async with engine.begin() as conn:
        for order_id in ("ord_a", "ord_b"):
            assert await store.insert_order(
                conn,
                make_order(
                    order_id=order_id,
                    payment_intent_id="pi_2",
                    attempt=2,
                    status="accepted",
                    earlier_intents=("pi_1",),
                ),
            )
        await store.set_order_fields(conn, "ord_b", pending_retry={"payment_intent_id": "pi_3"})

    async with engine.begin() as conn:
        recorded = [
            # the current attempt's status: recorded with its version
            await store.record_saga_status(conn, "ord_a", 3, "pi_2", "INVENTORY_RESERVED"),
            # a stale version: not recorded
            await store.record_saga_status(conn, "ord_a", 2, "pi_2", "PAYMENT_AUTHORIZED"),
            # an earlier attempt's status: its version only
            await store.record_saga_status(conn, "ord_a", 4, "pi_1", "PAYMENT_FAILED"),
            # a retry is pending: decided on the loaded order instead
            await store.record_saga_status(conn, "ord_b", 1, "pi_2", "PAYMENT_AUTHORIZED"),
            # an order payments does not know
            await store.record_saga_status(conn, "ord_x", 1, "pi_9", "PAYMENT_AUTHORIZED"),
        ]
    assert recorded == [True, False, True, False, False]
    rows = query(
        conninfo, "SELECT order_id, saga_status, saga_version, status FROM orders ORDER BY 1"
    )
    assert rows == [("ord_a", "INVENTORY_RESERVED", 4, "accepted"), ("ord_b", None, 0, "accepted")]
