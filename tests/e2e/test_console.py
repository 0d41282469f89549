"""The operator console over the running stack, through HTTP: its searches and filters
find real orders by each id, every page answers, its timeline reads every service's
database, and its unmatched-payment actions run the CLI's code behind the operator
token and the CSRF check, audited with the operator's name."""

from __future__ import annotations

import html
import re
from typing import Any

import httpx

from services.devclient import wait_for
from tests.e2e.conftest import CONSOLE_OPERATOR, CONSOLE_SECRET, Stack, new_id
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


def test_console_lists_the_notifications_once_their_outbox_rows_are_pruned(
    stack: Stack,
) -> None:
    """The relay prunes sent outbox rows after a day: the page's notifications come from
    the projection, with the row's times while it is kept."""
    order_id, intent, total = stocked_order(stack, prefix="ord_consn")
    stack.pay(order_id, intent, total, "sale")
    stack.wait_status(order_id, "PAID_CONFIRMED")
    sent = "SELECT id FROM outbox WHERE topic = 'customer.notifications.v1' AND key = %s"
    wait_for(
        lambda: stack.db("orders", sent + " AND sent_at IS NOT NULL", order_id.encode()),
        what="the notification published",
    )
    page = _get(stack, f"/console/orders/{order_id}").text
    kept = r"payment_confirmed \(attempt 1\) requested <time>[^<]+</time>, sent <time>"
    assert re.search(kept, page)
    pruned = stack.db(
        "orders",
        sent.replace("SELECT id FROM", "DELETE FROM") + " AND sent_at IS NOT NULL RETURNING id",
        order_id.encode(),
    )
    assert pruned
    assert not stack.db("orders", sent, order_id.encode())
    page = _get(stack, f"/console/orders/{order_id}").text
    assert "payment_confirmed (attempt 1) requested, sent (its outbox row is pruned)" in page


def test_console_filters_orders_by_conference(stack: Stack) -> None:
    """The checkout's conference_id reaches the projection (OrderRegistered): the
    operator finds a conference's orders, and only them."""
    order_id, conference = new_id("ord_conf"), new_id("conf")
    stack.set_stock(f"sku-{order_id}", 1)
    stack.place_order(order_id, intent=new_id("pi"), conference=conference)
    stack.wait_status(order_id, "PENDING_PAYMENT")
    link = f'href="/console/orders/{order_id}"'
    found = _get(stack, "/console/orders", conference=conference).text
    assert link in found
    assert found.count('class="order-link"') == 1  # that conference has this order only
    assert link not in _get(stack, "/console/orders", conference=new_id("conf")).text
    other, _, _ = stocked_order(stack, prefix="ord_noconf")
    assert (
        f'href="/console/orders/{other}"'
        not in _get(stack, "/console/orders", conference=conference).text
    )


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert m, "no CSRF field on the confirmation page"
    return m.group(1)


def _parked(stack: Stack, txn: str) -> int:
    rows = wait_for(
        lambda: stack.db(
            "payments",
            "SELECT id FROM unmatched_payments WHERE transaction_id = %s AND state = 'parked'",
            txn,
        ),
        what="the payment parked as unmatched",
    )
    return int(rows[0][0])


def _console_audit(stack: Stack, action: str, target: str) -> list[tuple[Any, ...]]:
    return stack.db(
        "orders",
        "SELECT outcome, details->>'operator' FROM audit_log"
        " WHERE subject = 'console' AND action = %s AND details->>'target' = %s",
        action,
        target,
    )


def test_console_attaches_an_unmatched_payment_to_the_order_it_proposes(stack: Stack) -> None:
    order_id, _intent, total = stocked_order(stack, prefix="ord_consu")
    txn = stack.pay(None, new_id("pi"), total, "sale")["transaction_id"]
    unmatched_id = _parked(stack, txn)
    attach = f"/console/unmatched/{unmatched_id}/resolve?order={order_id}"
    with httpx.Client(base_url=stack.url("orders"), timeout=60) as browser:
        listing = browser.get("/console/unmatched").text
        assert txn in listing
        assert attach in html.unescape(listing)  # proposed: pending, same amount and currency
        page = browser.get(attach)
        assert page.status_code == 200
        assert f"paysaga unmatched resolve {unmatched_id} --order {order_id}" in page.text
        url = f"/console/unmatched/{unmatched_id}/resolve"
        form = {"order": order_id, "operator_token": CONSOLE_SECRET}
        assert browser.post(url, data=form).status_code == 403  # no CSRF token
        assert (
            browser.post(
                url, data={**form, "csrf": _csrf(page.text), "operator_token": "x"}
            ).status_code
            == 403
        )
        assert stack.db(
            "payments", "SELECT state FROM unmatched_payments WHERE id = %s", unmatched_id
        ) == [("parked",)]
        done = browser.post(url, data={**form, "csrf": _csrf(page.text)})
    assert done.status_code == 200, done.text
    assert f"payment {txn} attached to order {order_id}" in done.text
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert stack.order(order_id)["transaction_id"] == txn  # type: ignore[index]
    assert _console_audit(stack, "unmatched_attach", str(unmatched_id)) == [
        ("done", CONSOLE_OPERATOR)
    ]


def test_console_gives_an_unmatched_payment_back_once(stack: Stack) -> None:
    txn = stack.pay(None, new_id("pi"), 2500, "authorize")["transaction_id"]
    unmatched_id = _parked(stack, txn)
    url = f"/console/unmatched/{unmatched_id}/resolve"
    with httpx.Client(base_url=stack.url("orders"), timeout=60) as browser:
        page = browser.get(f"{url}?refund=1")
        assert "--refund" in page.text
        form = {"csrf": _csrf(page.text), "operator_token": CONSOLE_SECRET}
        done = browser.post(url, data=form)
        assert done.status_code == 200, done.text
        assert stack.ledger(txn)["state"] == "voided"
        again = browser.post(url, data=form)
    assert again.status_code == 404  # no longer open: never a second void
    assert len(stack.ledger(txn)["voids"]) == 1
    assert _console_audit(stack, "unmatched_refund", str(unmatched_id)) == [
        ("done", CONSOLE_OPERATOR)
    ]
