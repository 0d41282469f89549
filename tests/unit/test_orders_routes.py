"""The orders service routes every event type topics.yaml lists on the topics it
consumes, and each has a payload model; the bridge keys records as docs/contract.md §2.2 says."""

from __future__ import annotations

import pytest
import yaml
from prometheus_client import CollectorRegistry

from schemas.events import EVENT_TYPES
from services.bridge.app import record_key
from services.orders.handlers import OrdersMetrics, Projection
from services.runtime.messages import routes_of
from services.runtime.topics import TOPICS_FILE


def test_routes_match_topics_yaml() -> None:
    topics = yaml.safe_load(TOPICS_FILE.read_text())["topics"]
    routes = routes_of(Projection(OrdersMetrics.create(CollectorRegistry())).handlers())
    consumed = {t for t, spec in topics.items() if "orders" in (spec.get("consumers") or [])}
    assert {r.topic for r in routes} == consumed
    for route in routes:
        assert set(route.handlers) == set(topics[route.topic]["events"])
        assert set(route.handlers) <= set(EVENT_TYPES)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"data": {"order_id": "ord_1", "payment_intent_id": "pi_1"}}', "ord_1"),
        (b'{"data": {"order_id": null, "payment_intent_id": "pi_1"}}', "pi_1"),
        (b'{"data": {"payment_intent_id": "pi_1"}}', "pi_1"),
    ],
)
def test_bridge_record_key(body: bytes, key: str) -> None:
    assert record_key(body) == key


@pytest.mark.parametrize("body", [b"", b"\xff", b"[]", b'{"data": []}', b'{"data": {}}'])
def test_bridge_record_key_rejects_unkeyable_bodies(body: bytes) -> None:
    with pytest.raises(ValueError, match=r"JSON|nothing to key"):
        record_key(body)
