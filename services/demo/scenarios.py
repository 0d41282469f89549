"""The demo's first part: one hand-made order per path of the saga, each printed with
its status history and the gateway's ledger."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from rich.table import Table

from services.demo.load import FINAL
from services.devclient import DevClient, new_id
from services.runtime.terminal import make_console

console = make_console()


@dataclasses.dataclass
class Scenario:
    name: str
    expect: str
    mode: str = "authorize"
    marker: str = ""
    stock: int = 10
    order_id: str = ""
    intent: str = ""
    txn: str = ""
    #: runs after the first attempt reached a final status (e.g. a retry)
    then: Callable[[DevClient, Scenario], None] | None = None
    unmatched_first: bool = False
    duplicates: int = 0
    #: the order comes without a payment_intent_id: paysaga requests the payment
    requested: bool = False


def _retry(client: DevClient, s: Scenario) -> None:
    s.intent = new_id("pi")
    client.retry(s.order_id, s.intent, "wallet")
    client.wait_status(s.order_id, "PENDING_PAYMENT")
    s.txn = client.pay(s.order_id, s.intent, 1500, "authorize")["transaction_id"]


SCENARIOS = [
    Scenario("authorize → capture", "PAID_CONFIRMED"),
    Scenario("sale (already captured)", "PAID_CONFIRMED", mode="sale"),
    Scenario("declined by the gateway", "PAYMENT_FAILED", mode="decline"),
    Scenario("declined, retried with a wallet", "PAID_CONFIRMED", mode="decline", then=_retry),
    Scenario("out of stock, authorization voided", "PAYMENT_FAILED", stock=0),
    Scenario("out of stock after a sale: refunded", "REFUNDED", mode="sale", stock=0),
    Scenario(
        "capture declined: stock released, voided", "PAYMENT_FAILED", marker="_capture_declined"
    ),
    Scenario("capture answers 503 twice", "PAID_CONFIRMED", marker="_capture_flaky"),
    Scenario("capture response lost: resolved", "PAID_CONFIRMED", marker="_capture_lost"),
    Scenario(
        "refund declined", "NEEDS_RECONCILIATION", mode="sale", stock=0, marker="_refund_declined"
    ),
    Scenario("payment before its order (unmatched)", "PAID_CONFIRMED", unmatched_first=True),
    Scenario("webhook delivered 3 times", "PAID_CONFIRMED", duplicates=2),
    Scenario("paysaga requests the payment", "PAID_CONFIRMED", requested=True),
    Scenario(
        "payment request refused", "PAYMENT_FAILED", requested=True, marker="_request_declined"
    ),
]


def run(client: DevClient) -> bool:
    for s in SCENARIOS:
        s.order_id, s.intent = new_id("demo"), new_id("pi") + s.marker
        if s.requested:  # request markers are read from the order id
            s.order_id, s.intent = s.order_id + s.marker, ""
        client.set_stock(f"sku-{s.order_id}", s.stock)
    for s in SCENARIOS:
        if s.unmatched_first:
            s.txn = client.pay(s.order_id, s.intent, 1500, s.mode)["transaction_id"]
        intent = s.intent or None
        client.place_order(s.order_id, intent=intent, items=[(f"sku-{s.order_id}", 1, 1500)])
    for s in SCENARIOS:
        if s.requested:
            _pay_requested(client, s)
        elif not s.unmatched_first:  # that one is matched (and paid) as soon as it registers
            client.wait_status(s.order_id, "PENDING_PAYMENT", timeout=60)
            sim = client.pay(s.order_id, s.intent, 1500, s.mode)
            s.txn = sim["transaction_id"]
            for _ in range(s.duplicates):
                client.post_webhook(sim["body"].encode(), sim["signature"])
    for s in SCENARIOS:
        _wait_final(client, s)
        if s.then is not None:
            s.then(client, s)
            _wait_final(client, s)
    return _summary(client)


def _pay_requested(client: DevClient, s: Scenario) -> None:
    """The checkout gets PaymentRequested and the customer pays on the gateway's page; a
    refused request fails the attempt without one."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if requests := client.payment_requests(s.order_id):
            s.intent = requests[0]["payment_intent_id"]
            s.txn = client.confirm(s.intent, s.mode)["transaction_id"]
            return
        order = client.order(s.order_id)
        if order and order["status"] in FINAL:
            return
        time.sleep(0.5)


def _wait_final(client: DevClient, s: Scenario) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        order = client.order(s.order_id)
        current = order["payment_intent_id"] if order else None
        if order and order["status"] in FINAL and current == (s.intent or None):
            return
        time.sleep(0.2)


def _summary(client: DevClient) -> bool:
    table = Table("path", "order", "status", "reason", "history", "gateway ledger")
    ok = True
    for s in SCENARIOS:
        order = client.order(s.order_id) or {"status": "UNKNOWN", "reason": None, "history": []}
        ledger = client.ledger(s.txn) if s.txn else {}
        good = order["status"] == s.expect
        ok = ok and good
        table.add_row(
            s.name,
            s.order_id,
            f"[{'green' if good else 'red'}]{order['status']}[/]",
            order["reason"] or "",
            " → ".join(h["status"] for h in order["history"]),
            f"{ledger.get('state', '-')}: {len(ledger.get('captures', []))} capture(s), "
            f"{len(ledger.get('voids', []))} void(s), {len(ledger.get('refunds', []))} refund(s)",
        )
    console.print(table)
    return ok
