"""Failed compensations that hold a customer's money are named by ``paysaga reconcile
--gateway`` (``compensation_failed``), even when the order's status moved on."""

from __future__ import annotations

import subprocess

import pytest

from services import devstack
from services.devclient import wait_for
from tests.e2e.conftest import Stack, new_id, paysaga
from tests.e2e.test_saga import Outcome, assert_agree, order_with_stock, stock_of

pytestmark = pytest.mark.e2e

PROFILE = devstack.PROFILES["test"]
REFUNDS = next(sp for sp in devstack.SERVICE_PROCESSES if sp.name == "refunds")


def reconcile(stack: Stack, order_id: str) -> subprocess.CompletedProcess[str]:
    return paysaga(stack, "reconcile", "--gateway", "--order", order_id)


def compensation(stack: Stack, txn: str) -> list[tuple[str, str]]:
    rows = stack.db(
        "refunds", "SELECT action, state FROM compensations WHERE transaction_id=%s", txn
    )
    return [(r[0], r[1]) for r in rows]


def test_a_failed_void_of_a_retried_attempt_is_named_by_reconcile(stack: Stack) -> None:
    """Attempt 1's capture is declined (PAYMENT_FAILED at once) and the customer retries
    and pays; only then does the void of attempt 1 fail. The projection ignores the
    stale attempt's CompensationFailed, so the order shows PAID_CONFIRMED while txn1
    is still held: reconcile must name it."""
    pidfile = PROFILE.root / "pids" / f"{REFUNDS.name}.pid"
    # refunds is held back so the void fails after the retry, deterministically
    assert devstack.stop_pid(pidfile, f"-m {REFUNDS.module}")
    try:
        order_id, intent, sku, total = order_with_stock(stack, 1, "_capture_declined_void_declined")
        first = stack.pay(order_id, intent, total)["transaction_id"]
        stack.wait_status(order_id, "PAYMENT_FAILED")
        second_intent = new_id("pi")
        stack.retry(order_id, second_intent, "wallet")
        stack.wait_status(order_id, "PENDING_PAYMENT")
        second = stack.pay(order_id, second_intent, total)["transaction_id"]
        stack.wait_status(order_id, "PAID_CONFIRMED")
    finally:
        devstack.services_up(PROFILE, stack.env)
    wait_for(lambda: compensation(stack, first) == [("void", "failed")], what="void failed")
    assert_agree(
        stack,
        order_id,
        second,
        Outcome("PAID_CONFIRMED", None, (1, 0, 0), ("payment_failed", "payment_confirmed")),
    )
    wait_for(lambda: stock_of(stack, sku) == (1, 0, 1), what="one unit sold")
    held = stack.ledger(first)
    assert (held["state"], held["voids"], held["captures"]) == ("authorized", [], [])

    found = reconcile(stack, order_id)
    assert found.returncode == 1, found.stdout
    line = next(ln for ln in found.stdout.splitlines() if "compensation_failed" in ln)
    assert order_id in line
    assert f"void of {first}" in line
    assert second not in found.stdout


def test_a_failed_refund_is_named_by_reconcile(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, 0, "_refund_declined")
    txn = stack.pay(order_id, intent, total, "sale")["transaction_id"]
    stack.wait_status(order_id, "NEEDS_RECONCILIATION")
    assert compensation(stack, txn) == [("refund", "failed")]
    assert (len(stack.ledger(txn)["captures"]), stack.ledger(txn)["refunds"]) == (1, [])
    found = reconcile(stack, order_id)
    assert found.returncode == 1, found.stdout
    line = next(ln for ln in found.stdout.splitlines() if "compensation_failed" in ln)
    assert order_id in line
    assert f"refund of {txn}" in line
