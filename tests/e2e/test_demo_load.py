"""``make demo``'s load phase (services/demo/load.py) on the test stack: a conference's
ticket sales through every path at once, some ticket types selling out. Checked the way
a user would: each order's final status, the inventory's stock rows, the dead-letter
topics, ``paysaga reconcile`` — and the demo's own report agrees."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.demo import load as demo_load
from services.demo import report as demo_report
from services.runtime.cli_dlq import Filters, read_dead_letters
from tests.e2e.conftest import Stack, paysaga

pytestmark = pytest.mark.e2e


def test_demo_load_ends_every_order_as_its_path_expects(stack: Stack) -> None:
    done = demo_load.run(stack, 24)  # two orders per path

    assert {o.path for o in done.orders} == set(demo_load.PATHS)
    for o in done.orders:
        assert not o.error, f"{o.order_id} ({o.path.name}): {o.error}"
        current = stack.order(o.order_id)
        assert current is not None
        assert current["status"] == o.status
        sold_out = done.quotas[o.sku] < done.demand(o.sku)
        allowed = {o.path.expect, o.path.out_of_stock} if sold_out else {o.path.expect}
        assert o.status in allowed, f"{o.order_id} ({o.path.name}): {current}"
        if o.status != o.path.expect:
            assert current["reason"] == "out_of_stock", current
    assert any(o.reason == "out_of_stock" for o in done.orders), "no ticket type sold out"

    rows = stack.db(
        "inventory",
        "SELECT sku, available, reserved, sold FROM stock WHERE sku = ANY(%s)",
        list(done.quotas),
    )
    assert len(rows) == len(done.quotas)
    for sku, available, reserved, sold in rows:
        paid = [o for o in done.orders if o.sku == sku and o.status == "PAID_CONFIRMED"]
        assert available == done.quotas[sku]
        assert reserved == 0, f"{sku}: tickets still held"
        assert sold == len(paid) <= available, f"{sku}: {sold} sold, {len(paid)} paid"
        wanted = sum(o.path.expect == "PAID_CONFIRMED" for o in done.orders if o.sku == sku)
        assert sold == min(available, wanted), f"{sku}: quota {available}, {wanted} wanted"

    since = datetime.fromtimestamp(done.started_at, UTC)
    assert asyncio.run(read_dead_letters(stack.bootstrap, Filters(since=since))) == []

    orders = [arg for o in done.orders for arg in ("--order", o.order_id)]
    reconciled = paysaga(stack, "reconcile", "--gateway", *orders)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "reconcile: no violation" in reconciled.stdout

    summary = demo_report.build(stack, done)
    assert summary.failures == []
    assert len(summary.tables) == 4  # outcomes, tickets, rejections, latency
