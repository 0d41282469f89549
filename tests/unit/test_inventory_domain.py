"""Unit tests of services/inventory/domain.py (pure; no infrastructure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.inventory.domain import (
    Line,
    StockLevel,
    decide_settlement,
    merge_lines,
    stock_level_rejection,
    superseded_attempts,
)


def test_merge_lines_sums_per_sku_and_sorts_by_sku() -> None:
    lines = merge_lines([("TSHIRT", 1), ("TICKET", 2), ("TSHIRT", 3)])
    assert lines == (Line("TICKET", 2), Line("TSHIRT", 4))


def test_merge_lines_rejects_a_non_positive_quantity() -> None:
    with pytest.raises(ValueError, match="quantity"):
        merge_lines([("A", 0)])


@given(st.lists(st.tuples(st.sampled_from("ABCDE"), st.integers(1, 1000)), min_size=1))
def test_merge_lines_keeps_totals_in_one_lock_order(items: list[tuple[str, int]]) -> None:
    lines = merge_lines(items)
    skus = [line.sku for line in lines]
    assert skus == sorted(set(skus))
    for line in lines:
        assert line.quantity == sum(q for sku, q in items if sku == line.sku)


def test_sellable_is_what_is_neither_reserved_nor_sold() -> None:
    assert StockLevel("A", available=10, reserved=3, sold=2).sellable == 5


@pytest.mark.parametrize(
    ("current", "available", "refused"),
    [
        (None, 0, False),
        (None, 5, False),
        (StockLevel("A", 10, 3, 2), 5, False),
        (StockLevel("A", 10, 3, 2), 4, True),
        (StockLevel("A", 10, 0, 0), 0, False),
        (None, -1, True),
    ],
)
def test_a_quota_below_reserved_plus_sold_is_refused(
    current: StockLevel | None, available: int, refused: bool
) -> None:
    assert (stock_level_rejection(current, available) is not None) == refused


@pytest.mark.parametrize(
    ("state", "settlement", "decision"),
    [
        ("reserved", "commit", "apply"),
        ("reserved", "release", "apply"),
        ("committed", "commit", "duplicate"),
        ("released", "release", "duplicate"),
        ("committed", "release", "reject"),
        ("released", "commit", "reject"),
        ("failed", "commit", "reject"),
        ("failed", "release", "reject"),
        (None, "commit", "reject"),
    ],
)
def test_a_reservation_settles_once(state: str | None, settlement: str, decision: str) -> None:
    assert decide_settlement(state, settlement) == decision  # type: ignore[arg-type]


def test_a_newer_attempt_supersedes_only_earlier_reservations_still_held() -> None:
    held = [(1, "reserved"), (2, "released"), (3, "failed"), (4, "committed"), (5, "reserved")]
    assert superseded_attempts(6, held) == (1, 5)
    assert superseded_attempts(5, held) == (1,)  # its own reservation is not superseded
    assert superseded_attempts(1, [(1, "reserved")]) == ()
    assert superseded_attempts(2, []) == ()


def test_the_release_of_a_superseded_reservation_is_a_duplicate_afterwards() -> None:
    # CaptureDeclined / AuthorizationExpired of attempt 1 after attempt 2 released it
    assert decide_settlement("released", "release") == "duplicate"
