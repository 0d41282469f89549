"""The operator console over the running stack, through HTTP: its searches and filters
find real orders by each id, every page answers, and its timeline reads every
service's database."""

from __future__ import annotations

import httpx

from services.devclient import wait_for
from tests.e2e.conftest import Stack, new_id
from tests.e2e.test_confirmations import stocked_order


def _get(stack: Stack, path: str, **params: str) -> httpx.Response:
    return httpx.get(f"{stack.url('orders')}{path}", params=params, timeout=30)


def test_console_finds_an_order_by_each_of_its_ids(stack: Stack) -> None:
    order_id, intent, total = stocked_order(stack, prefix="ord_cons")
    txn = stack.pay(order_id, intent, total, "authorize")["transaction_id"]
    stack.wait_status(order_id, "PAID_CONFIRMED")
    link = f'href="/console/orders/{order_id}"'
    for q in (order_id, intent, txn):
        assert link in _get(stack, "/console/orders", q=q).text, q
    assert link not in _get(stack, "/console/orders", q=new_id("ord_none")).text
    assert link in _get(stack, "/console/orders", q=order_id, status="PAID_CONFIRMED").text
    assert link not in _get(stack, "/console/orders", q=order_id, status="REFUNDED").text
    assert link in _get(stack, "/console/orders", customer=f"cust-{order_id}").text
    assert link not in _get(stack, "/console/orders", q=order_id, age="60").text

    page = wait_for(
        lambda: (
            (r := _get(stack, f"/console/orders/{order_id}")).status_code == 200
            and f"capture:{txn}" in r.text
            and r
        ),
        what="the order's timeline with its capture",
    )
    text = page.text
    for status in ("PENDING_PAYMENT", "PAYMENT_AUTHORIZED", "INVENTORY_RESERVED", "PAID_CONFIRMED"):
        assert f'class="status s-{status}"' in text
    assert "payment.authorized" in text  # the confirmation, from payments
    assert f"sku-{order_id} \u00d7 1" in text  # inventory's reservation
    assert 'class="differs"' not in text  # the gateway agrees with us
    assert _get(stack, f"/console/orders/{new_id('ord_none')}").status_code == 404
    for path in ("/console/stalled", "/console/reconciliation", "/console/unmatched"):
        assert _get(stack, path).status_code == 200, path
    assert _get(stack, "/console/dead-letters").status_code == 200
