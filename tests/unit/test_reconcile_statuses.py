"""The gateway must hold what each final status says (services/reconcile/rules.py,
``status_rules``): pure over the gateway's answers to ``GET /v1/payments/{id}``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from services.reconcile.rules import status_rules

TXN = "txn_1"


def order(status: str, amount: int = 1500, currency: str = "EUR") -> SimpleNamespace:
    return SimpleNamespace(
        order_id="ord_1", status=status, transaction_id=TXN, amount=amount, currency=currency
    )


def payment(
    state: str,
    captures: tuple[int, ...] = (),
    refunds: tuple[int, ...] = (),
    voids: int = 0,
    currency: str = "EUR",
) -> dict[str, Any]:
    return {
        "transaction_id": TXN,
        "state": state,
        "captures": [{"capture_id": f"cap_{i}", "amount": a, "currency": currency}
                     for i, a in enumerate(captures)],
        "refunds": [{"refund_id": f"re_{i}", "amount": a, "currency": currency}
                    for i, a in enumerate(refunds)],
        "voids": [{"void_id": f"void_{i}"} for i in range(voids)],
    }  # fmt: skip


def rules(status: str, answer: dict[str, Any] | None, **kw: Any) -> list[str]:
    found = status_rules([order(status, **kw)], {TXN: answer})
    assert all(v.subject == "ord_1" for v in found)
    return [v.rule for v in found]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (payment("captured", (1500,)), []),
        (payment("refunded", (1500,), (1500,)), ["paid_but_not_held"]),  # refunded outside
        (payment("refunded", (1500,), (500,)), ["paid_but_not_held"]),  # partly refunded
        (payment("captured", (1500,), (500,)), ["paid_but_not_held"]),  # ledger says refund
        (payment("voided", voids=1), ["paid_but_not_held"]),
        (payment("authorized"), ["paid_but_not_held"]),  # never captured
        (payment("failed"), ["paid_but_not_held"]),
        (payment("disputed", (1500,)), ["paid_but_not_held"]),  # any other state
        (None, ["paid_but_not_held"]),  # the gateway does not know it
        (payment("captured", (1400,)), ["paid_amount_mismatch"]),
        (payment("captured", (1500,), currency="USD"), ["paid_amount_mismatch"]),
    ],
)
def test_a_paid_order_is_captured_for_its_amount_and_not_given_back(
    answer: dict[str, Any] | None, expected: list[str]
) -> None:
    assert rules("PAID_CONFIRMED", answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (payment("refunded", (1500,), (1500,)), []),
        (payment("voided", voids=1), []),  # an authorization given back by its void
        (payment("captured", (1500,)), ["refunded_not_at_gateway"]),
        (payment("refunded", (1500,), (500,)), ["refunded_not_at_gateway"]),  # partly
        (payment("authorized"), ["refunded_not_at_gateway"]),  # still held
        (payment("failed"), ["refunded_not_at_gateway"]),  # nothing was ever taken or returned
        (None, ["refunded_not_at_gateway"]),
    ],
)
def test_a_refunded_order_shows_the_refund_or_the_void(
    answer: dict[str, Any] | None, expected: list[str]
) -> None:
    assert rules("REFUNDED", answer) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (payment("failed"), []),  # declined
        (payment("voided", voids=1), []),  # out of stock: the authorization released
        (payment("authorized"), []),  # capture declined, its void still under way
        (payment("refunded", (1500,), (1500,)), []),
        (None, []),  # nothing held by a gateway that does not know it
        (payment("captured", (1500,)), ["failed_but_captured_at_gateway"]),
        (payment("refunded", (1500,), (500,)), ["failed_but_captured_at_gateway"]),
    ],
)
def test_a_failed_order_holds_no_captured_money(
    answer: dict[str, Any] | None, expected: list[str]
) -> None:
    assert rules("PAYMENT_FAILED", answer) == expected


@pytest.mark.parametrize(
    "status", ["PENDING_PAYMENT", "PAYMENT_AUTHORIZED", "INVENTORY_RESERVED", "REFUND_PENDING",
               "NEEDS_RECONCILIATION"]
)  # fmt: skip
def test_orders_in_flight_or_with_an_operator_are_not_judged(status: str) -> None:
    assert rules(status, payment("refunded", (1500,), (1500,))) == []


def test_an_order_without_a_transaction_is_not_looked_up() -> None:
    no_txn = SimpleNamespace(
        order_id="ord_2", status="PAYMENT_FAILED", transaction_id=None, amount=1, currency="EUR"
    )
    assert status_rules([no_txn], {}) == []


def test_the_detail_names_what_the_gateway_shows() -> None:
    [v] = status_rules([order("PAID_CONFIRMED")], {TXN: payment("refunded", (1500,), (1500,))})
    assert TXN in v.detail
    assert "refunded" in v.detail
