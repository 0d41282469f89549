"""Payments' domain values for tests: an order as payments knows it, a verified confirmation."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from services.payments.domain import Confirmation, Item, Order

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def make_order(**changes: Any) -> Order:
    order = Order(
        order_id="ord_1",
        customer_id="cus_1",
        currency="EUR",
        total_amount=10345,
        payment_intent_id="pi_1",
        payment_method="card",
        attempt=1,
        status="pending",
        items=(Item("TICKET-A", 2), Item("TSHIRT-M", 1)),
        correlation_id="corr_1",
        content_hash="hash_1",
    )
    return replace(order, **changes)


def make_confirmation(**changes: Any) -> Confirmation:
    confirmation = Confirmation(
        gateway="simgw",
        gateway_event_id="evt_1",
        type="payment.authorized",
        transaction_id="txn_1",
        payment_intent_id="pi_1",
        order_id="ord_1",
        amount=10345,
        currency="EUR",
        payment_method_type="card",
        brand="visa",
        last4="4242",
        failure_code=None,
        failure_message=None,
        record_time=NOW,
    )
    return replace(confirmation, **changes)
