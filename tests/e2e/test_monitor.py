"""The monitor (docs/contract.md §3.5) against the running stack: a saga stuck because capture
is down is reported once on ``saga.stalled.v1`` within its deadline and counted in
``paysaga_sagas_stalled``; a restarted monitor does not report it again; the gauge falls
once capture returns and the order is paid; ``NEEDS_RECONCILIATION`` is reported at once.

The stack runs the monitor with ``INVENTORY_RESERVED`` stalled after
``RESERVED_DEADLINE_S`` (tests/e2e/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.envelope import Envelope
from schemas.events import SagaStalled
from services import devstack
from services.devclient import read_all, wait_for
from tests.e2e.conftest import MONITOR_ENV, Stack
from tests.e2e.test_payment_requests import order_without_intent
from tests.e2e.test_saga import order_with_stock

pytestmark = pytest.mark.e2e

PROFILE = devstack.PROFILES["test"]
CAPTURE = next(sp for sp in devstack.SERVICE_PROCESSES if sp.name == "capture")
MONITOR = next(sp for sp in devstack.SERVICE_PROCESSES if sp.name == "monitor")
RESERVED_DEADLINE_S = int(MONITOR_ENV["PAYSAGA_MONITOR_STALL_AFTER_INVENTORY_RESERVED_S"])
#: a check every PAYSAGA_MONITOR_CHECK_INTERVAL_S, plus producing and reading the record
PROMPT_S = 3.0


def envelopes(stack: Stack, topic: str, order_id: str) -> list[Envelope]:
    recs = asyncio.run(read_all(stack.bootstrap, topic))
    return [Envelope.model_validate_json(m.value) for m in recs if m.key == order_id.encode()]


def reports(stack: Stack, order_id: str) -> list[tuple[Envelope, SagaStalled]]:
    """The order's SagaStalled events on saga.stalled.v1, in topic order."""
    found = envelopes(stack, "saga.stalled.v1", order_id)
    assert {e.event_type for e in found} <= {"SagaStalled"}
    return [(e, SagaStalled.model_validate(e.payload)) for e in found]


def entered(stack: Stack, order_id: str, status: str) -> datetime:
    """When the order entered ``status``: its OrderStatusChanged's occurred_at."""
    [env] = [
        e for e in envelopes(stack, "orders.status.v1", order_id) if e.payload["status"] == status
    ]
    return env.occurred_at


def stalled_gauge(stack: Stack, status: str) -> float:
    text = httpx.get(f"{stack.url('monitor')}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "paysaga_sagas_stalled" and sample.labels["status"] == status:
                return sample.value
    raise AssertionError(f"paysaga_sagas_stalled{{status={status!r}}} not exported")


def ready(stack: Stack) -> dict[str, Any] | None:
    try:
        r = httpx.get(f"{stack.url('monitor')}/readyz", timeout=2)
    except httpx.HTTPError:
        return None
    body: dict[str, Any] = r.json()
    return body if r.status_code == 200 else None


def assert_reported_in_time(
    stack: Stack, order_id: str, status: str, deadline_s: int
) -> tuple[Envelope, SagaStalled]:
    [(env, stalled)] = wait_for(
        lambda: reports(stack, order_id),
        timeout=deadline_s + 20,
        what=f"SagaStalled for {order_id}",
    )
    assert (stalled.order_id, stalled.status, stalled.deadline_seconds) == (
        order_id,
        status,
        deadline_s,
    )
    assert stalled.stalled_for_seconds >= deadline_s
    late = (env.occurred_at - entered(stack, order_id, status)).total_seconds()
    assert deadline_s <= late <= deadline_s + PROMPT_S, late
    return env, stalled


def test_a_saga_stuck_without_capture_is_reported_once_and_clears_when_paid(
    stack: Stack,
) -> None:
    capture_pid = PROFILE.root / "pids" / f"{CAPTURE.name}.pid"
    monitor_pid = PROFILE.root / "pids" / f"{MONITOR.name}.pid"
    assert devstack.stop_pid(capture_pid, f"-m {CAPTURE.module}")
    try:
        order_id, intent, _, total = order_with_stock(stack, 5)
        stack.pay(order_id, intent, total)
        stack.wait_status(order_id, "INVENTORY_RESERVED")
        env, _ = assert_reported_in_time(stack, order_id, "INVENTORY_RESERVED", RESERVED_DEADLINE_S)
        stalled_now = wait_for(
            lambda: stalled_gauge(stack, "INVENTORY_RESERVED"), what="the stalled gauge"
        )
        assert stalled_now >= 1

        # a restarted monitor recovers its table and does not report the order again:
        # once its gauge counts the order, its check has judged it (a report would have
        # been sent, acknowledged, before the gauge was set)
        assert devstack.stop_pid(monitor_pid, f"-m {MONITOR.module}")
        log = PROFILE.root / "logs" / f"{MONITOR.name}.log"
        devstack.spawn([sys.executable, "-m", MONITOR.module], log, monitor_pid, stack.env)
        wait_for(lambda: ready(stack), what="the restarted monitor ready")
        wait_for(
            lambda: stalled_gauge(stack, "INVENTORY_RESERVED") >= 1,
            what="the restarted monitor counting the stalled order",
        )
        assert [e.event_id for e, _ in reports(stack, order_id)] == [env.event_id]
    finally:
        devstack.services_up(PROFILE, stack.env)

    stack.wait_status(order_id, "PAID_CONFIRMED")
    wait_for(
        lambda: stalled_gauge(stack, "INVENTORY_RESERVED") < stalled_now,
        what="the stalled gauge falling once the order is paid",
    )
    assert len(reports(stack, order_id)) == 1


def test_needs_reconciliation_is_reported_at_once(stack: Stack) -> None:
    order_id, _ = order_without_intent(stack, "_request_down")
    stack.wait_status(order_id, "NEEDS_RECONCILIATION")
    _, stalled = assert_reported_in_time(stack, order_id, "NEEDS_RECONCILIATION", 1)
    assert stalled.deadline_seconds == 1
    assert stalled_gauge(stack, "NEEDS_RECONCILIATION") >= 1
    assert json.loads(httpx.get(f"{stack.url('monitor')}/healthz", timeout=5).text) == {
        "status": "alive",
        "service": "monitor",
    }
