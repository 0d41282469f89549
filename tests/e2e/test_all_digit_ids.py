"""All-digit identifiers are identifiers (docs/contract.md §2.2): an order id that happens to
pass the Luhn check, as one all-digit id in ten does, is paid like any other, while a
card number anywhere else in a confirmation is still refused."""

from __future__ import annotations

import asyncio
import random

import pytest

from schemas.carddata import luhn_valid
from services.devclient import produce, wait_for
from tests.e2e.conftest import Stack
from tests.e2e.test_saga import CONFIRMED, assert_agree, stock_of

pytestmark = pytest.mark.e2e

PAN = "4111111111111111"


def luhn_id(digits: int = 19) -> str:
    """A snowflake-style all-digit id whose last digit makes it Luhn-valid."""
    body = str(random.randrange(10 ** (digits - 2), 10 ** (digits - 1)))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def placed(stack: Stack) -> tuple[str, str, int]:
    order_id, intent, sku = luhn_id(), luhn_id(18), luhn_id()
    stack.set_stock(sku, 1)
    wait_for(lambda: stock_of(stack, sku) is not None, what=f"stock of {sku}")
    total = stack.place_order(order_id, intent=intent, items=[(sku, 1, 1500)])
    stack.wait_status(order_id, "PENDING_PAYMENT")
    return order_id, intent, total


def test_a_luhn_valid_all_digit_order_id_is_paid_end_to_end(stack: Stack) -> None:
    order_id, intent, total = placed(stack)
    # the simulator signs the webhook and delivers it through the bridge
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(stack, order_id, txn, CONFIRMED)
    assert stack.db(
        "payments", "SELECT outcome FROM confirmations WHERE order_id=%s", order_id
    ) == [("accepted",)]


@pytest.mark.parametrize(
    "extra_data",
    [
        {"payment_method": {"type": "card", "brand": "visa", "number": PAN}},
        {"failure_message": f"card {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]} was declined"},
        # an identifier-like key does not hide a card number
        {"payment_method": {"type": "card", "brand": "visa", "card_id": PAN}},
        {"customer_ref_id": f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"},
    ],
)
def test_a_card_number_elsewhere_is_still_refused(
    stack: Stack, extra_data: dict[str, object]
) -> None:
    order_id, intent, total = placed(stack)
    sim = stack.pay(order_id, intent, total, deliver=False, extra_data=extra_data)
    body, sig = sim["body"].encode(), sim["signature"]
    refused = stack.post_webhook(body, sig)
    assert refused.status_code == 422
    assert refused.json()["error"] == "card_number_present"
    # a producer bypassing the bridge: payments rejects it as well
    headers = [("paysaga-gateway", b"simgw"), ("paysaga-signature", sig.encode())]
    asyncio.run(produce(stack.bootstrap, "gateway.confirmations.v1", [(order_id, body)], headers))
    wait_for(
        lambda: stack.db(
            "orders",
            "SELECT 1 FROM audit_log WHERE (order_id=%s OR details->>'record_key'=%s)"
            " AND outcome='rejected' AND reason='card_number_present'",
            order_id,
            order_id,
        ),
        what="rejection audited",
    )
    assert [h["status"] for h in (stack.order(order_id) or {})["history"]] == ["PENDING_PAYMENT"]
    assert stack.db("payments", "SELECT 1 FROM confirmations WHERE order_id=%s", order_id) == []
