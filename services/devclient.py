"""A client for the local stack that acts like paysaga's neighbours: the checkout
(orders on Kafka), the gateway (the simulator signs and delivers webhooks to the
bridge), and a status reader (the status API, orders.status.v1). Used by ``make demo``
and the end-to-end tests — never by the services themselves."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.runtime.kafka import client_options
from services.runtime.settings import database_url_of, libpq_conninfo
from services.runtime.topics import partitions_of

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout: float = 60, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def envelope(
    event_type: str, payload: dict[str, Any], event_id: str | None = None, **extra: Any
) -> bytes:
    """A contract envelope, as an upstream producer writes it; ``extra`` adds envelope
    fields (``saga_seq``, ``causation_id``, ``correlation_id``, ...)."""
    doc = {
        "event_id": event_id or uuid.uuid4().hex,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "payload": payload,
        **extra,
    }
    return json.dumps(doc).encode()


def order_placed(
    order_id: str,
    intent: str | None,
    items: list[tuple[str, int, int]],
    currency: str = "EUR",
    method: str = "card",
    event_id: str | None = None,
    conference: str | None = None,
) -> bytes:
    """The checkout's OrderPlaced envelope; ``items`` are (sku, quantity, unit amount); no
    ``intent``: paysaga requests the payment (PaymentRequested)."""
    payload = {
        "order_id": order_id,
        "customer_id": f"cust-{order_id}",
        "conference_id": conference,
        "currency": currency,
        "items": [{"sku": s, "quantity": q, "unit_amount": a} for s, q, a in items],
        "discount_amount": 0,
        "delivery_fee": 0,
        "service_fee": 0,
        "total_amount": sum(q * a for _, q, a in items),
        "payment_intent_id": intent,
        "payment_method": method,
    }
    if intent is None:
        del payload["payment_intent_id"]
    return envelope("OrderPlaced", payload, event_id)


async def produce(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[str | None, bytes]],
    headers: list[tuple[str, bytes]] | None = None,
    timestamp_ms: int | None = None,
    partition: int | None = None,
) -> None:
    producer = AIOKafkaProducer(**client_options(bootstrap), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(
                topic,
                value=value,
                key=key.encode() if key else None,
                headers=headers or [],
                timestamp_ms=timestamp_ms,
                partition=partition,
            )
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record in ``topic`` up to its end offsets at call time."""
    consumer = AIOKafkaConsumer(**client_options(bootstrap), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await partitions_of(bootstrap, names=[topic])
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        while not all([await consumer.position(tp) >= ends[tp] for tp in tps]):
            batch = await consumer.getmany(timeout_ms=500)
            for msgs in batch.values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


@dataclasses.dataclass
class DevClient:
    bootstrap: str
    database_url: str
    env: dict[str, str]

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.env[f'PAYSAGA_{service.upper()}_PORT']}"

    # ---- checkout
    def place_order(
        self,
        order_id: str,
        *,
        intent: str | None,
        items: list[tuple[str, int, int]] | None = None,
        currency: str = "EUR",
        method: str = "card",
        event_id: str | None = None,
        conference: str | None = None,
    ) -> int:
        items = items if items is not None else [(f"sku-{order_id}", 1, 1000)]
        value = order_placed(order_id, intent, items, currency, method, event_id, conference)
        self.produce("checkout.orders.v1", order_id, value)
        return sum(q * a for _, q, a in items)

    def retry(self, order_id: str, intent: str | None, method: str = "wallet") -> None:
        payload = {"order_id": order_id, "payment_intent_id": intent, "payment_method": method}
        if intent is None:
            del payload["payment_intent_id"]
        self.produce("checkout.orders.v1", order_id, envelope("PaymentRetryRequested", payload))

    def set_stock(self, sku: str, available: int) -> None:
        payload = {"sku": sku, "available": available}
        self.produce("catalog.stock.v1", sku, envelope("StockLevelSet", payload))

    def produce(
        self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        asyncio.run(produce(self.bootstrap, topic, [(key, value)], headers=headers))

    # ---- gateway
    def pay(
        self,
        order_id: str | None,
        intent: str,
        amount: int,
        mode: str = "authorize",
        *,
        currency: str = "EUR",
        deliver: bool = True,
        extra_data: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "payment_intent_id": intent,
            "amount": amount,
            "currency": currency,
            "mode": mode,
            "deliver": deliver,
        }
        if order_id is not None:
            body["order_id"] = order_id
        if extra_data:
            body["extra_data"] = extra_data
        r = httpx.post(f"{self.url('gatewaysim')}/sim/payments", json=body, timeout=10)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def payment_requests(self, order_id: str) -> list[dict[str, Any]]:
        """PaymentRequested payloads for one order (payments.requests.v1), in topic order."""
        recs = asyncio.run(read_all(self.bootstrap, "payments.requests.v1"))
        return [json.loads(m.value)["payload"] for m in recs if m.key == order_id.encode()]

    def confirm(self, intent: str, mode: str = "authorize") -> dict[str, Any]:
        """The customer completes the gateway's payment page of a requested payment."""
        r = httpx.post(
            f"{self.url('gatewaysim')}/sim/payment_intents/{intent}/confirm",
            json={"mode": mode, "deliver": True},
            timeout=10,
        )
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def post_webhook(
        self,
        body: bytes,
        signature: str,
        gateway: str = "simgw",
        extra_headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        headers = {"paysaga-signature": signature, "content-type": "application/json"}
        return httpx.post(
            f"{self.url('bridge')}/webhooks/{gateway}",
            content=body,
            headers={**headers, **(extra_headers or {})},
            timeout=15,
        )

    def ledger(self, transaction_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url('gatewaysim')}/v1/payments/{transaction_id}", timeout=10)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    # ---- status
    def order(self, order_id: str) -> dict[str, Any] | None:
        r = httpx.get(f"{self.url('orders')}/orders/{order_id}", timeout=10)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def wait_status(self, order_id: str, status: str, timeout: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            o = self.order(order_id)
            return o if o and o["status"] == status else None

        return wait_for(reached, timeout, what=f"{order_id} {status} (now {self.order(order_id)})")

    def status_records(self, order_id: str) -> list[dict[str, Any]]:
        """Payloads of orders.status.v1 for one order, in topic order."""
        recs = asyncio.run(read_all(self.bootstrap, "orders.status.v1"))
        mine = [json.loads(m.value)["payload"] for m in recs if m.key == order_id.encode()]
        return sorted(mine, key=lambda p: p["version"])

    def notifications(self, order_id: str) -> list[dict[str, Any]]:
        recs = asyncio.run(read_all(self.bootstrap, "customer.notifications.v1"))
        return [json.loads(m.value)["payload"] for m in recs if m.key == order_id.encode()]

    def db(self, service: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        url = database_url_of(self.database_url, f"paysaga_{service}")
        with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()
