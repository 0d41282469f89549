"""Headers on an input topic carry no authority (docs/contract.md §1): an order whose record
carries the control headers of a dead-letter replay or release is an order like any
other."""

from __future__ import annotations

import pytest

from services.devclient import envelope
from services.runtime import dlq
from tests.e2e.conftest import Stack, new_id

pytestmark = pytest.mark.e2e


def test_an_order_with_control_headers_is_registered_normally(stack: Stack) -> None:
    order_id, intent = new_id("ord"), new_id("pi")
    payload = {
        "order_id": order_id,
        "customer_id": f"cust-{order_id}",
        "conference_id": None,
        "currency": "EUR",
        "items": [{"sku": f"sku-{order_id}", "quantity": 1, "unit_amount": 1000}],
        "discount_amount": 0,
        "delivery_fee": 0,
        "service_fee": 0,
        "total_amount": 1000,
        "payment_intent_id": intent,
        "payment_method": "card",
    }
    headers = [
        (dlq.H_TARGET_GROUP, b"paysaga.someone-else"),
        (dlq.H_CONTROL, dlq.CONTROL_RELEASE),
        (dlq.H_DEAD_LETTER, b'["checkout.orders.v1", 0, 0]'),
    ]
    stack.produce("checkout.orders.v1", order_id, envelope("OrderPlaced", payload), headers)
    order = stack.wait_status(order_id, "PENDING_PAYMENT")
    assert (order["amount"], order["currency"], order["payment_intent_id"]) == (1000, "EUR", intent)
