"""The metrics added for an SRE, where their behaviour is pure: gateway calls by
operation and outcome, step latency, the periodic reconcile's gauge."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from services import reconcile
from services.orders import app as orders_app
from services.orders.handlers import OrdersMetrics
from services.runtime.gateway_client import GatewayClient, GatewayUnavailableError
from services.runtime.metrics import GatewayMetrics, RuntimeMetrics


async def _no_sleep(_: float) -> None:
    return None


def _client(registry: CollectorRegistry, *answers: httpx.Response) -> GatewayClient:
    queue = list(answers)
    return GatewayClient(
        "http://gateway.test",
        max_attempts=2,
        rng=random.Random(1),
        sleep=_no_sleep,
        transport=httpx.MockTransport(lambda _: queue.pop(0)),
        metrics=GatewayMetrics.create(registry),
    )


def _calls(registry: CollectorRegistry, operation: str, outcome: str) -> float | None:
    return registry.get_sample_value(
        "paysaga_gateway_call_seconds_count", {"operation": operation, "outcome": outcome}
    )


async def test_each_gateway_call_is_observed_once_by_operation_and_outcome() -> None:
    registry = CollectorRegistry()
    declined = httpx.Response(402, json={"error": {"code": "expired", "message": "x"}})
    async with _client(
        registry,
        httpx.Response(503),  # retried: still one call
        httpx.Response(200, json={"capture_id": "c"}),
        declined,
        httpx.Response(200, json={"status": "captured"}),
        httpx.Response(503),
        httpx.Response(503),
    ) as client:
        assert (await client.capture("t1", 100, "EUR", "capture:t1")).kind == "succeeded"
        assert (await client.void("t2", "void:t2")).kind == "declined"
        await client.get_payment("t1")
        with pytest.raises(GatewayUnavailableError):
            await client.get_payment("t3")
    assert _calls(registry, "capture", "succeeded") == 1
    assert _calls(registry, "void", "declined") == 1
    assert _calls(registry, "lookup", "succeeded") == 1
    assert _calls(registry, "lookup", "unavailable") == 1
    assert _calls(registry, "refund", "succeeded") is None


async def test_a_payment_request_refused_is_declined() -> None:
    registry = CollectorRegistry()
    refused = httpx.Response(422, json={"error": {"code": "bad_method", "message": "no"}})
    async with _client(registry, refused) as client:
        outcome = await client.create_payment_intent("o1", 100, "EUR", "card", "intent:o1:1")
    assert outcome.kind == "declined"
    assert _calls(registry, "payment_intent", "declined") == 1


def test_a_step_is_observed_from_its_record_time_to_now() -> None:
    registry = CollectorRegistry()
    metrics = RuntimeMetrics.create(registry)
    metrics.observe_steps("inventory", [("PaymentAccepted", time.time() - 2.0)])
    labels = {"service": "inventory", "event_type": "PaymentAccepted"}
    assert registry.get_sample_value("paysaga_step_latency_seconds_count", labels) == 1
    total = registry.get_sample_value("paysaga_step_latency_seconds_sum", labels)
    assert total is not None
    assert 2.0 <= total < 3.0
    under_one = {**labels, "le": "1.0"}
    assert registry.get_sample_value("paysaga_step_latency_seconds_bucket", under_one) == 0


async def test_reconcile_gauge_counts_by_rule_and_drops_a_cleared_rule_to_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = [
        [
            reconcile.Violation("outbox_row_dead", "orders/1", "x"),
            reconcile.Violation("outbox_row_dead", "orders/2", "x"),
            reconcile.Violation("paid_without_capture", "o1", "x"),
        ],
        [reconcile.Violation("paid_without_capture", "o1", "x")],
    ]
    asked: list[str | None] = []

    def check(gateway_url: str | None = None) -> list[reconcile.Violation]:
        asked.append(gateway_url)
        return runs.pop(0)

    monkeypatch.setattr(reconcile, "check", check)
    registry = CollectorRegistry()
    metrics = OrdersMetrics.create(registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    stop = asyncio.Event()
    task = asyncio.create_task(orders_app.reconcile_gauge(metrics, 0.01, None)(stop))
    deadline = time.monotonic() + 10
    # the third run finds no more scripted answers: it fails, and is counted so
    while not value("paysaga_reconcile_runs_total", outcome="failed"):
        assert time.monotonic() < deadline, "no third run"
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert value("paysaga_reconcile_runs_total", outcome="ok") == 2
    assert value("paysaga_reconcile_violations", kind="outbox_row_dead") == 0
    assert value("paysaga_reconcile_violations", kind="paid_without_capture") == 1
    assert asked[:2] == [None, None]  # the gateway is not asked unless configured
