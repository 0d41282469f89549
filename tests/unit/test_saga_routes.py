"""The routing tables of every service that consumes events (inventory, capture,
refunds, payments, orders) agree with topics.yaml and with docs/saga-events.md's "who
consumes what". Tables are keyed by the events' model classes; topics.yaml names event
types, each a model's ``event_type_of``."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from schemas.contract import OrderPlaced, OrderStatusChanged, PaymentRetryRequested, StockLevelSet
from schemas.envelope import event_type_of
from schemas.events import (
    EVENT_TYPES,
    AuthorizationExpired,
    CaptureDeclined,
    PaymentAccepted,
    PaymentCaptured,
    PaymentIntentCreated,
    SaleConfirmed,
    StockReservationFailed,
    StockReserved,
)
from services.capture.handlers import HANDLERS as CAPTURE
from services.inventory.handlers import HANDLERS as INVENTORY
from services.orders.handlers import OrdersMetrics, Projection
from services.payments.handlers import PaymentsHandlers
from services.payments.metrics import Metrics
from services.refunds.handlers import HANDLERS as REFUNDS
from services.runtime.messages import Handlers
from services.runtime.topics import TOPICS_FILE

EXPECTED: dict[str, dict[str, set[type[BaseModel]]]] = {
    "inventory": {
        "catalog.stock.v1": {StockLevelSet},
        "payments.events.v1": {PaymentAccepted},
        "capture.events.v1": {
            PaymentCaptured, SaleConfirmed, CaptureDeclined, AuthorizationExpired,
        },
    },
    "capture": {"inventory.events.v1": {StockReserved}},
    "refunds": {
        "inventory.events.v1": {StockReservationFailed},
        "capture.events.v1": {CaptureDeclined, AuthorizationExpired},
    },
    "payments": {
        "checkout.orders.v1": {OrderPlaced, PaymentRetryRequested},
        "orders.status.v1": {OrderStatusChanged},
        "payments.events.v1": {PaymentIntentCreated},
    },
}  # fmt: skip
_PAYMENTS = PaymentsHandlers({}, 300, timedelta(hours=1), Metrics.create(CollectorRegistry()))
ROUTES: dict[str, Handlers] = {
    "inventory": INVENTORY,
    "capture": CAPTURE,
    "refunds": REFUNDS,
    "payments": _PAYMENTS.handlers(),
    "orders": Projection(OrdersMetrics.create(CollectorRegistry())).handlers(),
}


@pytest.mark.parametrize("service", sorted(EXPECTED))
def test_routes_match_the_documented_consumption(service: str) -> None:
    routes = {topic: set(handlers) for topic, handlers in ROUTES[service].items()}
    assert routes == EXPECTED[service]


@pytest.mark.parametrize("service", sorted(ROUTES))
def test_routes_match_topics_yaml(service: str) -> None:
    topics = yaml.safe_load(TOPICS_FILE.read_text())["topics"]
    for topic, handlers in ROUTES[service].items():
        assert service in topics[topic]["consumers"], f"{topic} does not list {service}"
        types = {event_type_of(model) for model in handlers}
        assert types <= set(topics[topic]["events"]), topic
        assert {EVENT_TYPES[t] for t in types} == set(handlers), "registered under its type"
