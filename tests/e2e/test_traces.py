"""W3C trace context across the saga (docs/contract.md §3.6): every record carries a
``traceparent`` header; each record continues the trace of the record whose handling
wrote it, and an input without one starts a new trace."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

import pytest

from services.devclient import order_placed, read_all, wait_for
from services.runtime import topics, tracing
from tests.e2e.conftest import Stack, new_id
from tests.e2e.test_payment_requests import order_without_intent

pytestmark = pytest.mark.e2e

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
SAGA_TOPICS = (
    topics.CHECKOUT_ORDERS_TOPIC,
    topics.CONFIRMATIONS_TOPIC,
    topics.PAYMENTS_TOPIC,
    topics.INVENTORY_TOPIC,
    topics.CAPTURE_TOPIC,
    topics.STATUS_TOPIC,
    topics.NOTIFICATIONS_TOPIC,
    topics.AUDIT_TOPIC,
)


def traceparent(trace_id: str) -> bytes:
    return f"00-{trace_id}-{secrets.token_hex(8)}-01".encode()


def records_of(stack: Stack, order_id: str) -> dict[str, list[Any]]:
    """The order's records per saga topic (audit records by their payload's order id)."""
    out: dict[str, list[Any]] = {}
    for topic in SAGA_TOPICS:
        recs = asyncio.run(read_all(stack.bootstrap, topic))
        out[topic] = [
            m
            for m in recs
            if m.key == order_id.encode()
            or (topic == topics.AUDIT_TOPIC and order_id.encode() in (m.value or b""))
        ]
    return out


def trace_ids(records: list[Any]) -> list[str | None]:
    """The trace id of each record's ``traceparent`` header (None: none, or malformed)."""
    ids: list[str | None] = []
    for m in records:
        value = dict(m.headers or ()).get("traceparent")
        match = TRACEPARENT.match(value.decode()) if value else None
        ids.append(match.group(1) if match else None)
    return ids


def paid_order(stack: Stack, order_tp: bytes | None, webhook_tp: bytes | None) -> str:
    """An authorized, reserved, captured and confirmed order: OrderPlaced with
    ``order_tp``, its confirmation posted to the bridge with ``webhook_tp``."""
    order_id, intent, sku = new_id("ord"), new_id("pi"), new_id("sku")
    stack.set_stock(sku, 2)
    wait_for(
        lambda: stack.db("inventory", "SELECT 1 FROM stock WHERE sku=%s", sku),
        what=f"stock of {sku}",
    )
    headers = [("traceparent", order_tp)] if order_tp else None
    value = order_placed(order_id, intent, [(sku, 1, 1500)])
    stack.produce(topics.CHECKOUT_ORDERS_TOPIC, order_id, value, headers)
    stack.wait_status(order_id, "PENDING_PAYMENT")
    sim = stack.pay(order_id, intent, 1500, deliver=False)
    response = stack.post_webhook(
        sim["body"].encode(),
        sim["signature"],
        extra_headers={"traceparent": webhook_tp.decode()} if webhook_tp else None,
    )
    assert response.status_code == 202, response.text
    stack.wait_status(order_id, "PAID_CONFIRMED")
    # the notification and the last audit records follow the final status
    wait_for(
        lambda: stack.notifications(order_id) and records_of(stack, order_id)[topics.CAPTURE_TOPIC],
        what="notification and capture records",
    )
    return order_id


def test_an_orders_records_on_every_saga_topic_share_its_trace(stack: Stack) -> None:
    trace = secrets.token_hex(16)
    order_id = paid_order(stack, traceparent(trace), traceparent(trace))
    by_topic = records_of(stack, order_id)
    for topic, recs in by_topic.items():
        assert recs, f"no record of {order_id} on {topic}"
        assert trace_ids(recs) == [trace] * len(recs), f"{topic}: {trace_ids(recs)}"
    # child spans: no record carries the span id of the input it came from unchanged
    spans = [
        dict(m.headers)["traceparent"].decode().split("-")[2]
        for recs in by_topic.values()
        for m in recs
    ]
    assert len(set(spans)) > len(SAGA_TOPICS)


def test_inputs_without_a_trace_start_one_and_what_they_cause_continues_it(
    stack: Stack,
) -> None:
    order_id = paid_order(stack, None, None)
    by_topic = records_of(stack, order_id)
    for topic in SAGA_TOPICS[2:]:
        ids = trace_ids(by_topic[topic])
        assert ids, f"no record of the order on {topic}"
        assert None not in ids, f"{topic}: a record without a valid traceparent"
    # the order's registration continues the trace its handling started; the payment's
    # acceptance (caused by the confirmation) continues the confirmation's
    payments = {json.loads(m.value)["event_type"]: m for m in by_topic[topics.PAYMENTS_TOPIC]}
    [registered] = trace_ids([payments["OrderRegistered"]])
    [accepted] = trace_ids([payments["PaymentAccepted"]])
    [confirmation] = trace_ids(by_topic[topics.CONFIRMATIONS_TOPIC])
    assert registered != accepted
    assert accepted == confirmation
    [captured] = trace_ids(by_topic[topics.CAPTURE_TOPIC])
    assert captured == accepted


def test_a_payment_request_continues_the_orders_trace(stack: Stack) -> None:
    """The request worker's event (payments.requests.v1) continues the trace of the
    OrderPlaced whose handling recorded the request (the intent row keeps it)."""
    trace, order_id = secrets.token_hex(16), new_id("ord")
    value = order_placed(order_id, None, [(new_id("sku"), 1, 900)])
    stack.produce(
        topics.CHECKOUT_ORDERS_TOPIC, order_id, value, [("traceparent", traceparent(trace))]
    )

    def requested() -> list[Any]:
        recs = asyncio.run(read_all(stack.bootstrap, topics.PAYMENT_REQUESTS_TOPIC))
        return [m for m in recs if m.key == order_id.encode()]

    records = wait_for(requested, what=f"PaymentRequested of {order_id}")
    assert trace_ids(records) == [trace]
    [row] = stack.db(
        "payments", "SELECT traceparent FROM payment_requests WHERE order_id=%s", order_id
    )
    assert tracing.trace_id_of(row[0]) == trace


def test_a_stalled_sagas_report_continues_the_orders_trace(stack: Stack) -> None:
    """The monitor's SagaStalled (saga.stalled.v1) carries a traceparent: a child span
    in the trace of the status record it reports on."""
    order_id, _ = order_without_intent(stack, "_request_down")
    stack.wait_status(order_id, "NEEDS_RECONCILIATION")  # reported at once (1 s)

    def of_order(topic: str) -> list[Any]:
        recs = asyncio.run(read_all(stack.bootstrap, topic))
        return [m for m in recs if m.key == order_id.encode()]

    [report] = wait_for(lambda: of_order(topics.STALLED_TOPIC), what=f"SagaStalled of {order_id}")
    [status] = [
        m
        for m in of_order(topics.STATUS_TOPIC)
        if json.loads(m.value)["payload"]["status"] == "NEEDS_RECONCILIATION"
    ]
    [trace] = trace_ids([status])
    assert trace is not None
    assert trace_ids([report]) == [trace]  # well-formed, in the order's trace
    # its own span: not the status record's span id carried over
    reported, reported_on = (dict(m.headers)["traceparent"].decode() for m in (report, status))
    assert reported.split("-")[2] != reported_on.split("-")[2]
