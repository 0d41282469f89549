"""``compensation_failed`` (services/reconcile/rules.py): when the gateway still holds the money
a failed void or refund was to give back."""

from __future__ import annotations

from typing import Any

import pytest

from services.reconcile.rules import compensation_outstanding


def cap(amount: int) -> dict[str, Any]:
    return {"capture_id": "cap_1", "amount": amount, "currency": "EUR"}


def ref(amount: int) -> dict[str, Any]:
    return {"refund_id": "re_1", "amount": amount, "currency": "EUR"}


@pytest.mark.parametrize(
    ("action", "payment", "outstanding"),
    [
        ("void", {"state": "authorized", "voids": []}, True),
        ("void", {"state": "voided", "voids": [{"void_id": "v"}]}, False),  # operator voided
        ("void", {"state": "captured", "captures": [cap(100)]}, False),  # not a hold any more
        ("refund", {"state": "captured", "captures": [cap(100)], "refunds": []}, True),
        ("refund", {"state": "refunded", "captures": [cap(100)], "refunds": [ref(40)]}, True),
        ("refund", {"state": "refunded", "captures": [cap(100)], "refunds": [ref(100)]}, False),
        ("refund", {"state": "voided", "captures": [], "refunds": []}, False),
    ],
)
def test_outstanding_until_the_gateway_shows_it_settled(
    action: str, payment: dict[str, Any], outstanding: bool
) -> None:
    assert compensation_outstanding(action, payment) is outstanding
