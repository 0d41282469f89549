"""``paysaga reconcile --gateway`` checks that the gateway holds what each final status
says: a paid order's money captured and kept, a refunded order's given back, a failed
order's never taken."""

from __future__ import annotations

import subprocess
import uuid

import httpx
import pytest

from tests.e2e.conftest import Stack, paysaga
from tests.e2e.test_saga import CONFIRMED, Outcome, assert_agree, order_with_stock

pytestmark = pytest.mark.e2e


def reconcile(stack: Stack, order_id: str) -> subprocess.CompletedProcess[str]:
    return paysaga(stack, "reconcile", "--gateway", "--order", order_id)


def test_a_paid_order_refunded_outside_paysaga_is_named(stack: Stack) -> None:
    """The money of a PAID_CONFIRMED order is refunded at the gateway under a key of its
    own (an operator at the gateway's dashboard, a dispute, a lost operator refund):
    nothing in paysaga changes, so only reconcile can tell."""
    order_id, intent, _, total = order_with_stock(stack, 1)
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(stack, order_id, txn, CONFIRMED)
    assert reconcile(stack, order_id).returncode == 0

    refund = httpx.post(
        f"{stack.url('gatewaysim')}/v1/payments/{txn}/refund",
        json={"amount": total, "currency": "EUR", "reason": "requested_by_customer"},
        headers={"Idempotency-Key": f"outside-{uuid.uuid4().hex}"},
        timeout=10,
    )
    assert refund.status_code == 200, refund.text
    assert stack.ledger(txn)["state"] == "refunded"
    assert (stack.order(order_id) or {})["status"] == "PAID_CONFIRMED"

    found = reconcile(stack, order_id)
    assert found.returncode == 1, found.stdout
    line = next(ln for ln in found.stdout.splitlines() if "paid_but_not_held" in ln)
    assert order_id in line
    assert txn in line


@pytest.mark.parametrize(
    ("stock", "mode", "outcome"),
    [
        (1, "sale", Outcome("PAID_CONFIRMED", None, (1, 0, 0), ("payment_confirmed",))),
        (0, "sale", Outcome("REFUNDED", "out_of_stock", (1, 1, 0), ("refunded",))),
        (0, "authorize", Outcome("PAYMENT_FAILED", "out_of_stock", (0, 0, 1), ("out_of_stock",))),
        (1, "decline", Outcome("PAYMENT_FAILED", "card_declined", (0, 0, 0), ("payment_failed",))),
    ],
)
def test_every_final_status_the_saga_reaches_agrees_with_the_gateway(
    stack: Stack, stock: int, mode: str, outcome: Outcome
) -> None:
    order_id, intent, _, total = order_with_stock(stack, stock)
    txn = stack.pay(order_id, intent, total, mode)["transaction_id"]
    assert_agree(stack, order_id, txn, outcome)
    found = reconcile(stack, order_id)
    assert found.returncode == 0, found.stdout
