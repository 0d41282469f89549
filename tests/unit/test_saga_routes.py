"""The routing tables of inventory, capture and refunds agree with topics.yaml and with
docs/saga-events.md's "who consumes what"."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import yaml

from schemas.events import EVENT_TYPES
from services.capture.handlers import HANDLERS as CAPTURE
from services.inventory.handlers import HANDLERS as INVENTORY
from services.refunds.handlers import HANDLERS as REFUNDS
from services.runtime.messages import Handler
from services.runtime.topics import TOPICS_FILE

EXPECTED = {
    "inventory": {
        "catalog.stock.v1": {"StockLevelSet"},
        "payments.events.v1": {"PaymentAccepted"},
        "capture.events.v1": {
            "PaymentCaptured", "SaleConfirmed", "CaptureDeclined", "AuthorizationExpired",
        },
    },
    "capture": {"inventory.events.v1": {"StockReserved"}},
    "refunds": {
        "inventory.events.v1": {"StockReservationFailed"},
        "capture.events.v1": {"CaptureDeclined", "AuthorizationExpired"},
    },
}  # fmt: skip
ROUTES: dict[str, Mapping[str, Mapping[str, Handler]]] = {
    "inventory": INVENTORY,
    "capture": CAPTURE,
    "refunds": REFUNDS,
}


@pytest.mark.parametrize("service", sorted(ROUTES))
def test_routes_match_the_documented_consumption(service: str) -> None:
    routes = {topic: set(handlers) for topic, handlers in ROUTES[service].items()}
    assert routes == EXPECTED[service]


@pytest.mark.parametrize("service", sorted(ROUTES))
def test_routes_match_topics_yaml(service: str) -> None:
    topics = yaml.safe_load(TOPICS_FILE.read_text())["topics"]
    for topic, handlers in ROUTES[service].items():
        assert service in topics[topic]["consumers"], f"{topic} does not list {service}"
        assert set(handlers) <= set(topics[topic]["events"]), topic
        assert set(handlers) <= set(EVENT_TYPES)
