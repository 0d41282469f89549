"""The orders service as a real process: saga events produced on the saga topics end in
the status projection, ``orders.status.v1``, ``customer.notifications.v1``, the status
API and the audit store. The orders database is shared: every test uses its own ids."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from services.runtime import migrate
from tests.conftest import Infra
from tests.support.harness import Proc, envelope, free_port, produce, query, read_all, uid, wait_for

pytestmark = pytest.mark.integration

PAYMENTS, INVENTORY, CAPTURE = "payments.events.v1", "inventory.events.v1", "capture.events.v1"
AUDIT = "audit.events.v1"
AUTHORIZATION_PATH = [
    "PENDING_PAYMENT",
    "PAYMENT_AUTHORIZED",
    "INVENTORY_RESERVED",
    "PAID_CONFIRMED",
]


@dataclasses.dataclass
class Orders:
    infra: Infra
    base_url: str
    conninfo: str

    def get(self, order_id: str) -> httpx.Response:
        return httpx.get(f"{self.base_url}/orders/{order_id}", timeout=5)

    def status(self, order_id: str) -> str | None:
        response = self.get(order_id)
        return str(response.json()["status"]) if response.status_code == 200 else None

    def produce(self, topic: str, key: str, *values: bytes) -> None:
        asyncio.run(produce(self.infra.bootstrap, topic, [(key, v) for v in values]))

    def published(self, topic: str, order_id: str) -> list[dict[str, Any]]:
        records = asyncio.run(read_all(self.infra.bootstrap, topic))
        return [json.loads(r.value) for r in records if r.key == order_id.encode()]

    def applied(self, order_id: str, event_id: str) -> bool:
        sql = "SELECT 1 FROM applied_events WHERE order_id = %s AND event_id = %s"
        return bool(query(self.conninfo, sql, order_id, event_id))


@pytest.fixture(scope="module")
def orders(infra: Infra) -> Iterator[Orders]:
    db_url = infra.db_url("paysaga_orders")
    migrate.upgrade("orders", db_url)  # a no-op after infra_up; needed with explicit servers
    port = free_port()
    proc = Proc(
        f"orders-{uid()}",
        ["-m", "services.orders.app"],
        env={
            "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": infra.bootstrap,
            "PAYSAGA_DATABASE_URL": infra.database_url,
            "PAYSAGA_ORDERS_PORT": str(port),
            "PAYSAGA_POLL_TIMEOUT_MS": "200",
        },
    ).start()
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.alive, proc.log_text()[-3000:]
        try:
            return httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=90, what="orders service ready")
    yield Orders(infra, base_url, infra.conninfo("paysaga_orders"))
    proc.stop()


class Saga:
    """One order's saga events, each enveloped with saga_seq and causation_id."""

    def __init__(self, flow: str = "authorization") -> None:
        self.order_id = uid("ord_")
        self.ctx = {
            "order_id": self.order_id,
            "attempt": 1,
            "payment_intent_id": f"pi_{self.order_id}",
            "transaction_id": f"txn_{self.order_id}",
            "flow": flow,
            "amount": 5000,
            "currency": "EUR",
            "gateway": "simgw",
        }
        self.ids: dict[str, str] = {}

    def event(self, event_type: str, payload: dict[str, Any], seq: int, cause: str,
              event_id: str | None = None) -> bytes:  # fmt: skip
        event_id = event_id or uid("evt_")
        self.ids.setdefault(event_type, event_id)
        return envelope(event_type, payload, event_id=event_id, saga_seq=seq,
                        causation_id=self.ids.get(cause, cause),
                        correlation_id=f"corr_{self.order_id}")  # fmt: skip

    def registered(self) -> bytes:
        c = self.ctx
        payload = {k: c[k] for k in ("order_id", "attempt", "amount", "currency")}
        payload |= {"customer_id": "cust_1", "payment_intent_id": c["payment_intent_id"]}
        return self.event("OrderRegistered", payload, 1, "checkout-record")

    def accepted(self, event_id: str | None = None) -> bytes:
        payload = self.ctx | {
            "customer_id": "cust_1",
            "items": [{"sku": "TICKET-STD", "quantity": 2}],
            "payment_method_type": "card",
            "brand": "visa",
            "last4": "4242",
        }
        return self.event("PaymentAccepted", payload, 1, "gateway-record", event_id)

    def reserved(self) -> bytes:
        items = [{"sku": "TICKET-STD", "quantity": 2}]
        return self.event("StockReserved", self.ctx | {"items": items}, 2, "PaymentAccepted")

    def captured(self) -> bytes:
        return self.event("PaymentCaptured", self.ctx | {"capture_id": "cap_1"}, 3, "StockReserved")

    def committed(self) -> bytes:
        items = [{"sku": "TICKET-STD", "quantity": 2}]
        return self.event("StockCommitted", self.ctx | {"items": items}, 4, "PaymentCaptured")

    def run_authorization_path(self, orders: Orders) -> None:
        orders.produce(PAYMENTS, self.order_id, self.registered(), self.accepted())
        orders.produce(INVENTORY, self.order_id, self.reserved())
        orders.produce(CAPTURE, self.order_id, self.captured())
        orders.produce(INVENTORY, self.order_id, self.committed())
        wait_for(lambda: orders.status(self.order_id) == "PAID_CONFIRMED", what="PAID_CONFIRMED")


def status_changes(orders: Orders, order_id: str, count: int) -> list[dict[str, Any]]:
    """The order's OrderStatusChanged records, once ``count`` are published."""
    return wait_for(
        lambda: len(found := orders.published("orders.status.v1", order_id)) >= count and found,
        what=f"{count} status changes of {order_id}",
    )


def test_authorization_path_ends_paid_confirmed(orders: Orders) -> None:
    saga = Saga()
    saga.run_authorization_path(orders)

    changes = status_changes(orders, saga.order_id, 4)
    assert [c["event_type"] for c in changes] == ["OrderStatusChanged"] * 4
    payloads = [c["payload"] for c in changes]
    assert [p["version"] for p in payloads] == [1, 2, 3, 4]
    assert [p["status"] for p in payloads] == AUTHORIZATION_PATH
    assert [p["previous_status"] for p in payloads] == [None, *AUTHORIZATION_PATH[:-1]]
    assert payloads[-1] == {
        "order_id": saga.order_id,
        "status": "PAID_CONFIRMED",
        "previous_status": "INVENTORY_RESERVED",
        "reason": None,
        "payment_intent_id": f"pi_{saga.order_id}",
        "transaction_id": f"txn_{saga.order_id}",
        "amount": 5000,
        "currency": "EUR",
        "version": 4,
    }
    # caused by the event that drove it, in the same correlation
    assert changes[-1]["causation_id"] == saga.ids["PaymentCaptured"]
    assert changes[-1]["correlation_id"] == f"corr_{saga.order_id}"

    notes = wait_for(
        lambda: orders.published("customer.notifications.v1", saga.order_id),
        what="notification",
    )
    assert [n["payload"] for n in notes] == [
        {
            "order_id": saga.order_id,
            "customer_id": "cust_1",
            "kind": "payment_confirmed",
            "status": "PAID_CONFIRMED",
            "reason": None,
            "amount": 5000,
            "currency": "EUR",
        }
    ]

    body = orders.get(saga.order_id).json()
    assert {k: v for k, v in body.items() if k not in ("history", "updated_at")} == {
        "order_id": saga.order_id,
        "status": "PAID_CONFIRMED",
        "reason": None,
        "amount": 5000,
        "currency": "EUR",
        "payment_intent_id": f"pi_{saga.order_id}",
        "transaction_id": f"txn_{saga.order_id}",
    }
    assert body["updated_at"].endswith("Z")
    assert [(h["status"], h["reason"]) for h in body["history"]] == [
        (s, None) for s in AUTHORIZATION_PATH
    ]
    assert all(h["at"].endswith("Z") for h in body["history"])


def test_events_out_of_causal_order_across_topics_end_in_the_same_state(orders: Orders) -> None:
    saga = Saga()
    # ids first, so that the early events can name causes not yet produced
    registered, accepted = saga.registered(), saga.accepted()
    # a stray card-data field beside the envelope is ignored, and never stored while held
    reserved = json.dumps({**json.loads(saga.reserved()), "cvv": "737"}).encode()
    orders.produce(INVENTORY, saga.order_id, reserved)
    orders.produce(CAPTURE, saga.order_id, saga.captured())
    orders.produce(INVENTORY, saga.order_id, saga.committed())
    wait_for(
        lambda: query(orders.conninfo, "SELECT count(*) FROM held_events WHERE order_id = %s",
                      saga.order_id)[0][0] == 3,
        what="three events held",
    )  # fmt: skip
    held = query(orders.conninfo, "SELECT envelope::text FROM held_events WHERE order_id = %s",
                 saga.order_id)  # fmt: skip
    # the value as a JSON string: a random event id may contain the digits 737
    assert not [row for row in held if '"737"' in row[0] or "cvv" in row[0]]
    assert orders.get(saga.order_id).status_code == 404  # nothing applied yet

    orders.produce(PAYMENTS, saga.order_id, registered, accepted)
    wait_for(lambda: orders.status(saga.order_id) == "PAID_CONFIRMED", what="PAID_CONFIRMED")
    payloads = [c["payload"] for c in status_changes(orders, saga.order_id, 4)]
    assert [(p["version"], p["status"]) for p in payloads] == list(
        enumerate(AUTHORIZATION_PATH, start=1)
    )
    sql = "SELECT count(*) FROM held_events WHERE order_id = %s"
    assert query(orders.conninfo, sql, saga.order_id)[0][0] == 0
    assert len(orders.published("customer.notifications.v1", saga.order_id)) == 1


def test_duplicate_event_changes_nothing(orders: Orders) -> None:
    saga = Saga()
    saga.run_authorization_path(orders)
    status_changes(orders, saga.order_id, 4)
    duplicate = saga.event(
        "PaymentCaptured", saga.ctx | {"capture_id": "cap_1"}, 3, "StockReserved",
        event_id=saga.ids["PaymentCaptured"],
    )  # fmt: skip
    # a later event of the same partition: once applied, the duplicate was handled
    barrier = saga.event("AuthorizationExpired", saga.ctx, 3, "StockReserved")
    orders.produce(CAPTURE, saga.order_id, duplicate, barrier)
    barrier_id = json.loads(barrier)["event_id"]
    wait_for(lambda: orders.applied(saga.order_id, barrier_id), what="barrier applied")

    assert len(orders.published("orders.status.v1", saga.order_id)) == 4
    assert len(orders.published("customer.notifications.v1", saga.order_id)) == 1
    assert len(orders.get(saga.order_id).json()["history"]) == 4


def test_late_event_that_would_move_backwards_is_ignored(orders: Orders) -> None:
    saga = Saga()
    saga.run_authorization_path(orders)
    status_changes(orders, saga.order_id, 4)
    # a redelivered confirmation under a new id, and a decline after the capture
    late_accept = saga.accepted(event_id=uid("evt_"))
    late_decline = saga.event(
        "CaptureDeclined", saga.ctx | {"decline_code": "do_not_honor"}, 3, "StockReserved"
    )
    orders.produce(PAYMENTS, saga.order_id, late_accept)
    orders.produce(CAPTURE, saga.order_id, late_decline)
    for value in (late_accept, late_decline):
        event_id = json.loads(value)["event_id"]
        wait_for(lambda e=event_id: orders.applied(saga.order_id, e), what="late event handled")

    body = orders.get(saga.order_id).json()
    assert body["status"] == "PAID_CONFIRMED"
    assert len(body["history"]) == 4
    assert len(orders.published("orders.status.v1", saga.order_id)) == 4
    kinds = [n["payload"]["kind"] for n in orders.published("customer.notifications.v1",
                                                            saga.order_id)]  # fmt: skip
    assert kinds == ["payment_confirmed"]


def test_status_api_404_and_openapi(orders: Orders) -> None:
    response = orders.get(uid("ord_unknown_"))
    assert response.status_code == 404
    assert response.json() == {"detail": "order not found"}
    spec = httpx.get(f"{orders.base_url}/openapi.json", timeout=5).json()
    assert "/orders/{order_id}" in spec["paths"]
    metrics = httpx.get(f"{orders.base_url}/metrics", timeout=5).text
    assert "paysaga_order_status_changes_total" in metrics
    assert "paysaga_orders_held_events" in metrics


def test_audit_events_are_stored_append_only(orders: Orders) -> None:
    order_id = uid("ord_")
    payload = {
        "subject": "gateway_confirmation",
        "action": "verify_signature",
        "outcome": "rejected",
        "reason": "signature_invalid",
        "order_id": order_id,
        "transaction_id": None,
        "gateway_event_id": "evt_gw_1",
        "details": {"gateway": "simgw", "attempts": 1},
    }
    value = envelope("AuditRecorded", payload, event_id=uid("evt_"))
    orders.produce(AUDIT, order_id, value, value)  # the second is a duplicate
    sql = "SELECT event_id, action, outcome, reason, details FROM audit_log WHERE order_id = %s"
    rows = wait_for(lambda: query(orders.conninfo, sql, order_id), what="audit row")
    assert len(rows) == 1
    assert rows[0][1:] == ("verify_signature", "rejected", "signature_invalid",
                           {"gateway": "simgw", "attempts": 1})  # fmt: skip
    with psycopg.connect(orders.conninfo, autocommit=True) as conn:
        for statement in ("UPDATE audit_log SET outcome = 'accepted' WHERE order_id = %s",
                          "DELETE FROM audit_log WHERE order_id = %s"):  # fmt: skip
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement, (order_id,))


def test_malformed_payloads_are_dead_lettered_without_card_data(orders: Orders) -> None:
    saga = Saga()
    broken = saga.event("StockReserved", {"order_id": saga.order_id}, 2, "PaymentAccepted")
    orders.produce(INVENTORY, saga.order_id, broken)
    audit_key = uid("ord_")
    pan = "4111111111111111"
    carded = envelope("AuditRecorded", {
        "subject": "s", "action": "a", "outcome": "o", "reason": None,
        "details": {"note": f"card {pan}"},
    })  # fmt: skip
    orders.produce(AUDIT, audit_key, carded)

    sql = ("SELECT error_class, error_message FROM dead_letters "
           "WHERE consumer_group = 'paysaga.orders' AND order_key = %s")  # fmt: skip
    for key in (saga.order_id, audit_key):
        rows = wait_for(lambda k=key: query(orders.conninfo, sql, k), what=f"dead letter {key}")
        assert rows[0][0] == "PermanentError"
        assert "schema_violation" in rows[0][1]
        assert pan not in rows[0][1]
    assert query(orders.conninfo, "SELECT 1 FROM audit_log WHERE order_id = %s", audit_key) == []
