"""A refund found by the refunds worker's look-up settles the claim only if it returned
the claimed money (services/refunds/domain.py, docs/contract.md §3.1 REFUNDED); a mismatch is a
``Failed`` round, which the worker emits as CompensationFailed (NEEDS_RECONCILIATION)."""

from __future__ import annotations

from typing import Any

import pytest

from services.refunds import domain

CLAIM = domain.Claim("txn_1", "refund", 1250, "EUR", "out_of_stock", "unknown", 2)


def refund(amount: Any, currency: str = "EUR", refund_id: str = "re_1") -> dict[str, Any]:
    return {"refund_id": refund_id, "amount": amount, "currency": currency, "reason": "x"}


@pytest.mark.parametrize(
    "refunds",
    [
        [refund(500)],  # an operator's partial refund, made outside paysaga
        [refund(1250, "USD")],
        [refund(1250), refund(1, refund_id="re_2")],  # more than the claim
        [refund(None)],
        [{"refund_id": "re_1"}],  # a refund that does not say what it returned
    ],
)
def test_a_refund_of_another_amount_or_currency_fails_for_an_operator(
    refunds: list[dict[str, Any]],
) -> None:
    payment = {"state": "refunded", "refunds": refunds}
    assert domain.after_lookup(CLAIM, payment) == domain.Failed("amount_mismatch")


@pytest.mark.parametrize(
    "refunds",
    [[refund(1250)], [refund(500, refund_id="re_0"), refund(750)]],
)
def test_refunds_of_exactly_the_claim_succeed(refunds: list[dict[str, Any]]) -> None:
    payment = {"state": "refunded", "refunds": refunds}
    assert domain.after_lookup(CLAIM, payment) == domain.Succeeded("re_1")
