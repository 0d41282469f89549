"""The full saga end to end: inventory, capture, refunds and compensations against the
gateway simulator. After each path, the gateway ledger, the stores, the status API and
the customer notifications must agree (``assert_agree``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from services.devclient import wait_for
from tests.e2e.conftest import Stack, new_id, paysaga

pytestmark = pytest.mark.e2e


def order_with_stock(
    stack: Stack, stock: int | None, marker: str = "", qty: int = 1
) -> tuple[str, str, str, int]:
    order_id, intent, sku = new_id("ord"), new_id("pi") + marker, new_id("sku")
    if stock is not None:
        stack.set_stock(sku, stock)
        wait_for(lambda: stock_of(stack, sku) is not None, what=f"stock of {sku}")
    total = stack.place_order(order_id, intent=intent, items=[(sku, qty, 1500)])
    stack.wait_status(order_id, "PENDING_PAYMENT")
    return order_id, intent, sku, total


def stock_of(stack: Stack, sku: str) -> tuple[int, int, int] | None:
    rows = stack.db("inventory", "SELECT available, reserved, sold FROM stock WHERE sku=%s", sku)
    return rows[0] if rows else None


def reservation(stack: Stack, order_id: str) -> list[str]:
    return [
        r[0]
        for r in stack.db(
            "inventory",
            "SELECT state FROM reservations WHERE order_id=%s ORDER BY attempt",
            order_id,
        )
    ]


@dataclass(frozen=True)
class Outcome:
    """Where a path ends: the status API's status and reason, the gateway ledger's
    (captures, refunds, voids) of the transaction, and the notification kinds sent."""

    status: str
    reason: str | None
    ledger: tuple[int, int, int]
    notifications: tuple[str, ...]


CONFIRMED = Outcome("PAID_CONFIRMED", None, (1, 0, 0), ("payment_confirmed",))
VOIDED_OUT_OF_STOCK = Outcome("PAYMENT_FAILED", "out_of_stock", (0, 0, 1), ("out_of_stock",))


def assert_agree(stack: Stack, order_id: str, txn: str, outcome: Outcome) -> dict[str, Any]:
    """Status API, orders.status.v1, notifications and the gateway ledger tell one story."""
    status, notifications, expected = outcome.status, outcome.notifications, outcome.ledger
    order = stack.wait_status(order_id, status)
    assert order["reason"] == outcome.reason
    assert order["transaction_id"] == txn
    # compensations after a final status (the void after a declined capture) are eventual
    wait_for(
        lambda: (
            tuple(len(stack.ledger(txn)[k]) for k in ("captures", "refunds", "voids")) == expected
        ),
        what=f"ledger (captures, refunds, voids) == {expected}: {stack.ledger(txn)}",
    )
    records = wait_for(
        lambda: (r := stack.status_records(order_id)) and r[-1]["status"] == status and r,
        what="orders.status.v1 caught up",
    )
    assert [r["version"] for r in records] == list(range(1, len(records) + 1))
    assert [r["status"] for r in records] == [h["status"] for h in order["history"]]
    if notifications:
        kinds = wait_for(
            lambda: len(n := stack.notifications(order_id)) >= len(notifications) and n,
            what=f"notifications {notifications}",
        )
        assert sorted(k["kind"] for k in kinds) == sorted(notifications)
    else:  # written in the status change's transaction: none now means none
        assert stack.notifications(order_id) == []
    return order


def test_authorization_is_reserved_captured_and_confirmed(stack: Stack) -> None:
    order_id, intent, sku, total = order_with_stock(stack, 3)
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    order = assert_agree(stack, order_id, txn, CONFIRMED)
    assert [h["status"] for h in order["history"]] == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert stack.ledger(txn)["state"] == "captured"
    wait_for(lambda: reservation(stack, order_id) == ["committed"], what="stock committed")
    assert stock_of(stack, sku) == (3, 0, 1)


def test_sale_is_reserved_and_confirmed_without_a_gateway_call(stack: Stack) -> None:
    order_id, intent, sku, total = order_with_stock(stack, 3)
    txn = stack.pay(order_id, intent, total, "sale")["transaction_id"]
    assert_agree(stack, order_id, txn, CONFIRMED)
    assert [c["via"] for c in stack.ledger(txn)["captures"]] == ["sale"]  # no capture call
    wait_for(lambda: stock_of(stack, sku) == (3, 0, 1), what="sold")


def test_out_of_stock_authorization_is_voided_and_nothing_captured(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, 0)
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(stack, order_id, txn, VOIDED_OUT_OF_STOCK)
    assert stack.ledger(txn)["state"] == "voided"
    assert reservation(stack, order_id) == ["failed"]


def test_out_of_stock_sale_is_refunded_exactly_once(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, 0)
    txn = stack.pay(order_id, intent, total, "sale")["transaction_id"]
    order = assert_agree(
        stack, order_id, txn, Outcome("REFUNDED", "out_of_stock", (1, 1, 0), ("refunded",))
    )
    assert "REFUND_PENDING" in [h["status"] for h in order["history"]]


def test_unknown_sku_is_out_of_stock(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, None)
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(stack, order_id, txn, VOIDED_OUT_OF_STOCK)


def test_capture_declined_restores_stock_and_voids(stack: Stack) -> None:
    order_id, intent, sku, total = order_with_stock(stack, 2, "_capture_declined")
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(
        stack,
        order_id,
        txn,
        Outcome("PAYMENT_FAILED", "capture_declined", (0, 0, 1), ("payment_failed",)),
    )
    wait_for(lambda: stock_of(stack, sku) == (2, 0, 0), what="stock restored")
    assert reservation(stack, order_id) == ["released"]


def test_flaky_capture_is_retried_with_the_same_key_and_captures_once(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, 2, "_capture_flaky")
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(stack, order_id, txn, CONFIRMED)


def test_lost_capture_response_is_resolved_by_lookup_and_captures_once(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, 2, "_capture_lost")
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(stack, order_id, txn, CONFIRMED)


def test_refund_declined_needs_reconciliation(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, 0, "_refund_declined")
    txn = stack.pay(order_id, intent, total, "sale")["transaction_id"]
    order = assert_agree(
        stack, order_id, txn, Outcome("NEEDS_RECONCILIATION", "refund_failed", (1, 0, 0), ())
    )
    assert "REFUND_PENDING" in [h["status"] for h in order["history"]]


def test_retry_with_another_method_after_a_capture_decline(stack: Stack) -> None:
    order_id, intent, sku, total = order_with_stock(stack, 2, "_capture_declined")
    first = stack.pay(order_id, intent, total)["transaction_id"]
    stack.wait_status(order_id, "PAYMENT_FAILED")
    second_intent = new_id("pi")
    stack.retry(order_id, second_intent, "wallet")
    stack.wait_status(order_id, "PENDING_PAYMENT")
    second = stack.pay(order_id, second_intent, total)["transaction_id"]
    assert_agree(
        stack,
        order_id,
        second,
        Outcome("PAID_CONFIRMED", None, (1, 0, 0), ("payment_failed", "payment_confirmed")),
    )
    assert len(stack.ledger(first)["captures"]) == 0
    wait_for(lambda: stock_of(stack, sku) == (2, 0, 1), what="one unit sold")


def test_fifty_concurrent_orders_for_ten_units_never_oversell(stack: Stack) -> None:
    sku = new_id("sku")
    stack.set_stock(sku, 10)
    wait_for(lambda: stock_of(stack, sku) is not None, what="stocked")
    orders = [(new_id("ord"), new_id("pi")) for _ in range(50)]
    for order_id, intent in orders:
        stack.place_order(order_id, intent=intent, items=[(sku, 1, 700)])
    for order_id, _ in orders:
        stack.wait_status(order_id, "PENDING_PAYMENT")
    with ThreadPoolExecutor(10) as pool:
        txns = list(pool.map(lambda o: stack.pay(o[0], o[1], 700)["transaction_id"], orders))

    def final() -> list[str] | None:
        statuses = [(stack.order(o) or {}).get("status") for o, _ in orders]
        done = all(s in ("PAID_CONFIRMED", "PAYMENT_FAILED") for s in statuses)
        return statuses if done else None  # type: ignore[return-value]

    statuses = wait_for(final, timeout=180, what="50 orders settled")
    assert statuses.count("PAID_CONFIRMED") == 10
    assert statuses.count("PAYMENT_FAILED") == 40
    assert stock_of(stack, sku) == (10, 0, 10)
    for (order_id, _), txn, status in zip(orders, txns, statuses, strict=True):
        ledger = stack.ledger(txn)
        if status == "PAYMENT_FAILED":
            assert (stack.order(order_id) or {})["reason"] == "out_of_stock"
            assert ledger["captures"] == []  # nothing charged
        else:
            assert len(ledger["captures"]) == 1


def test_multi_line_order_with_one_short_line_reserves_nothing(stack: Stack) -> None:
    plenty, scarce = new_id("sku"), new_id("sku")
    stack.set_stock(plenty, 5)
    stack.set_stock(scarce, 1)
    wait_for(
        lambda: stock_of(stack, scarce) is not None and stock_of(stack, plenty), what="stocked"
    )
    order_id, intent = new_id("ord"), new_id("pi")
    total = stack.place_order(order_id, intent=intent, items=[(plenty, 2, 1000), (scarce, 2, 500)])
    stack.wait_status(order_id, "PENDING_PAYMENT")
    txn = stack.pay(order_id, intent, total)["transaction_id"]
    assert_agree(stack, order_id, txn, VOIDED_OUT_OF_STOCK)
    assert stock_of(stack, plenty) == (5, 0, 0)
    assert stock_of(stack, scarce) == (1, 0, 0)
    short = stack.db("inventory", "SELECT short_skus FROM reservations WHERE order_id=%s", order_id)
    assert short == [([scarce],)]


def test_reconcile_passes_on_the_stack_and_names_a_violation(stack: Stack) -> None:
    order_id, intent, _, total = order_with_stock(stack, 1)
    stack.pay(order_id, intent, total)
    stack.wait_status(order_id, "PAID_CONFIRMED")
    ok = paysaga(stack, "reconcile", "--gateway", "--order", order_id)
    assert ok.returncode == 0, ok.stdout
    # break the rule on purpose: a paid order whose capture row says it was declined
    txn = (stack.order(order_id) or {})["transaction_id"]
    stack.db(
        "capture", "UPDATE captures SET state='declined' WHERE transaction_id=%s RETURNING 1", txn
    )
    bad = paysaga(stack, "reconcile", "--order", order_id)
    stack.db(
        "capture", "UPDATE captures SET state='captured' WHERE transaction_id=%s RETURNING 1", txn
    )
    assert bad.returncode == 1
    assert "paid_without_capture" in bad.stdout
    assert order_id in bad.stdout


def test_reconcile_names_money_captured_for_a_rejected_confirmation(stack: Stack) -> None:
    """A sale of the wrong amount is captured at the gateway but rejected by payments
    (no status change): only reconcile can tell an operator to give the money back."""
    order_id, intent, _, total = order_with_stock(stack, 1)
    txn = stack.pay(order_id, intent, total + 100, "sale")["transaction_id"]
    wait_for(
        lambda: stack.db(
            "orders",
            "SELECT reason FROM audit_log WHERE transaction_id=%s AND outcome='rejected'",
            txn,
        ),
        what="rejection audited",
    )
    assert (stack.order(order_id) or {})["status"] == "PENDING_PAYMENT"
    assert len(stack.ledger(txn)["captures"]) == 1
    found = paysaga(stack, "reconcile", "--gateway", "--order", order_id)
    assert found.returncode == 1, found.stdout
    assert "captured_but_rejected" in found.stdout
    assert txn in found.stdout
    assert "amount_mismatch" in found.stdout


def test_reconcile_names_money_captured_for_a_parked_confirmation_rejected_later(
    stack: Stack,
) -> None:
    """The sale arrives before its order, is parked, and is rejected (wrong amount) when
    the order arrives: reconcile names the captured money just the same."""
    order_id, intent, sku = new_id("ord"), new_id("pi"), new_id("sku")
    stack.set_stock(sku, 1)
    txn = stack.pay(order_id, intent, 1600, "sale")["transaction_id"]
    wait_for(
        lambda: stack.db(
            "payments", "SELECT 1 FROM unmatched_payments WHERE transaction_id=%s", txn
        ),
        what="parked",
    )
    stack.place_order(order_id, intent=intent, items=[(sku, 1, 1500)])
    wait_for(
        lambda: stack.db(
            "orders",
            "SELECT 1 FROM audit_log WHERE transaction_id=%s AND subject='unmatched_payment'"
            " AND outcome='rejected' AND reason='amount_mismatch'",
            txn,
        ),
        what="rejection audited",
    )
    assert (stack.order(order_id) or {})["status"] == "PENDING_PAYMENT"
    found = paysaga(stack, "reconcile", "--gateway", "--order", order_id)
    assert found.returncode == 1, found.stdout
    assert "captured_but_rejected" in found.stdout
    assert txn in found.stdout
