"""Payments' domain values for tests: an order as payments knows it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from services.payments.domain import Item, Order


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
