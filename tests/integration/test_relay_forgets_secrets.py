"""A payment request's outbox row (it carries the gateway's client secret) is deleted
once Kafka acknowledged it, in the statement that marks the pass's other rows sent; any
other row is kept, marked sent, for the outbox retention.

Real PostgreSQL (a database of the refunds schema) and the real broker; the relay's
pass is driven directly."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.metrics import RuntimeMetrics
from services.runtime.relay import FORGOTTEN_ONCE_SENT, OutboxRelay, RelaySettings
from services.runtime.topics import PAYMENT_REQUESTS_TOPIC, PAYMENTS_TOPIC
from tests.conftest import Infra
from tests.integration.conftest import refunds_db
from tests.support.harness import query, read_all

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with refunds_db(infra, "forget") as found:
        yield found


async def test_a_sent_payment_request_row_is_deleted_and_other_rows_are_marked_sent(
    infra: Infra, db: tuple[AsyncEngine, str]
) -> None:
    assert PAYMENT_REQUESTS_TOPIC in FORGOTTEN_ONCE_SENT
    engine, conninfo = db
    run = uuid.uuid4().hex
    for topic in (PAYMENT_REQUESTS_TOPIC, PAYMENTS_TOPIC):
        value = f'{{"run": "{run}", "topic": "{topic}"}}'.encode()
        sql = "INSERT INTO outbox (topic, key, value) VALUES (%s, %s, %s) RETURNING id"
        query(conninfo, sql, topic, f"ord_{run}".encode(), value)
    r = OutboxRelay(
        service="refunds",
        engine=engine,
        conninfo=conninfo,
        bootstrap=infra.bootstrap,
        metrics=RuntimeMetrics.create(CollectorRegistry()),
        settings=RelaySettings(),
    )
    r._producer = await r._start_producer()
    try:
        assert not await r._publish_batch()
    finally:
        await r._producer.stop()

    rows = query(conninfo, "SELECT topic, sent_at IS NOT NULL FROM outbox ORDER BY id")
    assert rows == [(PAYMENTS_TOPIC, True)]  # the request's row is gone, the other kept
    for topic in (PAYMENT_REQUESTS_TOPIC, PAYMENTS_TOPIC):  # both acknowledged by Kafka
        on_kafka = [m for m in await read_all(infra.bootstrap, topic) if run.encode() in m.value]
        assert len(on_kafka) == 1, topic
