"""The client secret of a requested payment (docs/contract.md §3.7) stays out of error messages
on the real database: transaction B writes it to the outbox, and when that write fails
(a serialization failure, a connection lost mid-statement) the error the work loop logs
must not carry the statement's parameters (psycopg shows a binary parameter cut
short, and the log line is the message's first line)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import DBAPIError

from services.gatewaysim.app import create_app
from services.gatewaysim.ledger import Simulator
from services.gatewaysim.settings import GatewaySimSettings
from services.payments import request_store, store
from services.payments.domain import Item, Order
from services.payments.request_worker import RequestMetrics, RequestWorker
from services.runtime import migrate
from services.runtime.errors import said
from services.runtime.gateway_client import GatewayClient
from services.runtime.outbox import Cause
from services.runtime.retry import RetryPolicy
from services.runtime.service import make_engine
from tests.conftest import Infra
from tests.support.harness import uid

pytestmark = pytest.mark.integration

#: the outbox refuses PaymentRequested rows as a serialization failure would
FAIL_REQUESTED = """
CREATE FUNCTION refuse_requested() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.topic = 'payments.requests.v1' THEN
    RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse_requested BEFORE INSERT ON outbox
  FOR EACH ROW EXECUTE FUNCTION refuse_requested();
"""


@pytest.fixture
def payments_db(infra: Infra) -> Iterator[str]:
    dbname = f"paysaga_payments_{uid('secret')}"
    with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        migrate.upgrade("payments", infra.db_url(dbname))
        with psycopg.connect(infra.conninfo(dbname), autocommit=True) as conn:
            conn.execute(FAIL_REQUESTED)
        yield infra.db_url(dbname)
    finally:
        with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


async def test_a_failed_outbox_write_of_payment_requested_names_no_client_secret(
    payments_db: str,
) -> None:
    app = create_app(GatewaySimSettings())
    sim: Simulator = app.state.simulator
    engine = make_engine(payments_db, pool_size=2)
    order = Order(
        order_id=uid("ord"), customer_id="cus_1", currency="EUR", total_amount=2500,
        payment_intent_id=None, payment_method="card", attempt=1, status="pending",
        items=(Item("A", 1),), correlation_id=None, content_hash="h",
    )  # fmt: skip
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await store.insert_order(conn, order)
        await request_store.record_request(conn, order, Cause(uid("evt"), 1, None), now)
    gateway = GatewayClient("http://sim", transport=httpx.ASGITransport(app=app))
    worker = RequestWorker(
        engine, gateway, RetryPolicy(3, 0.1, 0.1), RequestMetrics.create(CollectorRegistry()),
        lease=timedelta(seconds=30),
    )  # fmt: skip
    try:
        assert await worker.tick()  # the round started
        with pytest.raises(DBAPIError, match="could not serialize") as failed:
            await worker.drain()  # and ended in the error
    finally:
        await gateway.aclose()
        await engine.dispose()
    [(_, (status, answer))] = sim.replies.values()
    assert status == 200
    secret = answer["client_secret"]
    # neither what the work loop logs nor the whole message (SQL and its parameters)
    assert secret not in said(failed.value)
    assert secret not in str(failed.value)
    assert secret not in repr(failed.value)
