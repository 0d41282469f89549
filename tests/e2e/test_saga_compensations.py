"""Failed compensations that hold a customer's money are named by ``paysaga reconcile
--gateway`` (``compensation_failed``), even when the order's status moved on; and a
compensation whose outcome is unknown when its rounds are spent is not failed but
looked up until the gateway settles it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from services import devstack
from services.devclient import wait_for
from tests.e2e.conftest import Stack, new_id, paysaga
from tests.e2e.test_saga import (
    VOIDED_OUT_OF_STOCK,
    Outcome,
    assert_agree,
    order_with_stock,
    stock_of,
)

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


@contextlib.contextmanager
def refunds_with(stack: Stack, **env: str) -> Iterator[None]:
    """The refunds service runs with ``env`` on top of the stack's inside the block."""
    pidfile = PROFILE.root / "pids" / f"{REFUNDS.name}.pid"
    assert devstack.stop_pid(pidfile, f"-m {REFUNDS.module}")
    try:
        devstack.services_up(PROFILE, {**stack.env, **env})
        yield
    finally:
        devstack.stop_pid(pidfile, f"-m {REFUNDS.module}")
        devstack.services_up(PROFILE, stack.env)


#: one round, one try per call: the first lost answer spends the whole budget
ONE_ROUND = {
    "PAYSAGA_REFUNDS_MAX_ATTEMPTS": "1",
    "PAYSAGA_GATEWAY_MAX_ATTEMPTS": "1",
    "PAYSAGA_REFUNDS_STALLED_RETRY_MAX_S": "1",
}


def test_a_refund_whose_answer_is_lost_in_its_last_round_is_looked_up_not_failed(
    stack: Stack,
) -> None:
    """The gateway applies the refund and the answer times out in the only round
    allowed: the outcome is unknown, so the refund is looked up instead of failed —
    the order ends REFUNDED, one refund in the ledger, one `refunded` notification."""
    with refunds_with(stack, **ONE_ROUND):
        order_id, intent, _, total = order_with_stock(stack, 0, "_refund_lost")
        txn = stack.pay(order_id, intent, total, "sale")["transaction_id"]
        order = assert_agree(
            stack, order_id, txn, Outcome("REFUNDED", "out_of_stock", (1, 1, 0), ("refunded",))
        )
    assert "REFUND_PENDING" in [h["status"] for h in order["history"]]
    assert compensation(stack, txn) == [("refund", "succeeded")]
    assert [n["kind"] for n in stack.notifications(order_id)] == ["refunded"]
    assert len(stack.ledger(txn)["refunds"]) == 1


def test_a_void_whose_answer_is_lost_in_its_last_round_is_looked_up_not_failed(
    stack: Stack,
) -> None:
    with refunds_with(stack, **ONE_ROUND):
        order_id, intent, _, total = order_with_stock(stack, 0, "_void_lost")
        txn = stack.pay(order_id, intent, total)["transaction_id"]
        assert_agree(stack, order_id, txn, VOIDED_OUT_OF_STOCK)
    assert compensation(stack, txn) == [("void", "succeeded")]
    assert [n["kind"] for n in stack.notifications(order_id)] == ["out_of_stock"]
    assert stack.ledger(txn)["state"] == "voided"
