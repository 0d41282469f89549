"""Pure decisions of the inventory service.

Guarantees: no I/O, no clock. The reservation itself is atomic in the database
(``store.hold_claimed``: conditional UPDATEs in SKU order inside a savepoint, backed by the
CHECK ``reserved + sold <= available``); this module decides what surrounds it: how an
order's lines become one lock order, which stock levels are acceptable, and which
settlement a reservation may still take (reserved → committed | released, once), and
which earlier attempts' reservations a newer payment attempt of the order supersedes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Line",
    "ReservationState",
    "Settlement",
    "SettlementDecision",
    "StockLevel",
    "decide_settlement",
    "merge_lines",
    "stock_level_rejection",
    "superseded_attempts",
]

ReservationState = Literal["reserved", "failed", "released", "committed"]
Settlement = Literal["commit", "release"]
SettlementDecision = Literal["apply", "duplicate", "reject"]

_TARGET: dict[Settlement, ReservationState] = {"commit": "committed", "release": "released"}


@dataclass(frozen=True, slots=True)
class Line:
    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class StockLevel:
    """``available`` is the SKU's whole quota as set by the catalog; ``reserved`` and
    ``sold`` are parts of it, so what can still be sold is ``sellable``."""

    sku: str
    available: int
    reserved: int
    sold: int

    @property
    def sellable(self) -> int:
        return self.available - self.reserved - self.sold


def merge_lines(items: Iterable[tuple[str, int]]) -> tuple[Line, ...]:
    """One line per SKU (quantities summed), sorted by SKU. The sort is the single lock
    order of every reservation, commit and release, so two concurrent ones never wait
    on each other's rows in opposite orders (no deadlocks)."""
    totals: dict[str, int] = {}
    for sku, quantity in items:
        if quantity < 1:
            raise ValueError(f"quantity of {sku!r} must be >= 1, got {quantity}")
        totals[sku] = totals.get(sku, 0) + quantity
    return tuple(Line(sku, totals[sku]) for sku in sorted(totals))


def stock_level_rejection(current: StockLevel | None, available: int) -> str | None:
    """Why ``available`` cannot be set, or None. A quota below what is already reserved
    or sold would break "reserved quantity never exceeds stock"; it is rejected rather
    than clamped, because a clamp would silently re-open those units for sale when the
    reservations are released."""
    if available < 0:
        return f"available must be >= 0, got {available}"
    if current is not None and current.reserved + current.sold > available:
        return (
            f"{current.sku}: cannot set available={available} below reserved "
            f"({current.reserved}) + sold ({current.sold})"
        )
    return None


def decide_settlement(state: ReservationState | None, settlement: Settlement) -> SettlementDecision:
    """A held reservation settles once. The same settlement again is a duplicate (a
    redelivered or re-emitted event); anything else — no reservation, a failed one, or
    the opposite settlement already taken — is a saga inconsistency for an operator."""
    if state == "reserved":
        return "apply"
    if state == _TARGET[settlement]:
        return "duplicate"
    return "reject"


def superseded_attempts(
    attempt: int, held: Iterable[tuple[int, ReservationState]]
) -> tuple[int, ...]:
    """The earlier attempts of an order whose reservations a newer accepted attempt
    releases: those still ``reserved``. A retry is accepted only after the order became
    PAYMENT_FAILED, so an earlier attempt can no longer commit; its settlement
    (CaptureDeclined, AuthorizationExpired) may still wait on another topic, and the
    retry must not be refused as out of stock by units that attempt holds. That later
    release then finds the reservation released already: a duplicate, a no-op."""
    return tuple(sorted(n for n, state in held if n < attempt and state == "reserved"))
