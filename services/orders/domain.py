"""Pure decisions of the orders service: the status projection (docs/contract.md §3.1), customer
notifications (§3.3) and the causal gate that orders an order's events
(docs/saga-events.md, "Ordering in the status projection").

Guarantees: no I/O, no clock, no randomness. `version` grows by exactly one per status
change; a change never moves backwards within a payment attempt, never leaves
PAID_CONFIRMED or REFUNDED, and never applies an older attempt's event; each
(attempt, notification kind) is produced at most once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, Literal

from schemas.contract import reason_code

__all__ = [
    "Notification",
    "OrderView",
    "Outcome",
    "StatusChange",
    "decide",
    "is_ready",
    "release_order",
]

Status = Literal[
    "PENDING_PAYMENT",
    "PAYMENT_AUTHORIZED",
    "INVENTORY_RESERVED",
    "PAID_CONFIRMED",
    "PAYMENT_FAILED",
    "REFUND_PENDING",
    "REFUNDED",
    "NEEDS_RECONCILIATION",
]
NotificationKind = Literal["payment_confirmed", "payment_failed", "out_of_stock", "refunded"]


@dataclass(frozen=True, slots=True)
class OrderView:
    """The projected status of one order; `notified` holds the (attempt, kind) pairs
    already sent to the customer."""

    order_id: str
    customer_id: str
    status: Status
    reason: str | None
    attempt: int
    amount: int
    currency: str
    #: None until the gateway created the attempt's requested payment (docs/contract.md §3.7)
    payment_intent_id: str | None
    transaction_id: str | None
    version: int
    notified: frozenset[tuple[int, str]]
    #: the checkout's conference (OrderRegistered), for the console's filter
    conference_id: str | None = None


@dataclass(frozen=True, slots=True)
class StatusChange:
    """The OrderStatusChanged payload (`dataclasses.asdict` gives the wire dict)."""

    order_id: str
    status: Status
    previous_status: Status | None
    reason: str | None
    payment_intent_id: str | None
    transaction_id: str | None
    amount: int
    currency: str
    version: int


@dataclass(frozen=True, slots=True)
class Notification:
    """The CustomerNotificationRequested payload."""

    order_id: str
    customer_id: str
    kind: NotificationKind
    status: Status
    reason: str | None
    amount: int
    currency: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """`view` is the state to save (unchanged when `change` is None). `ignored_reason`
    explains an event that would drive a status but was not applied; it is None for
    events that drive no status."""

    view: OrderView | None
    change: StatusChange | None = None
    notification: Notification | None = None
    ignored_reason: str | None = None


# Forward moves within one payment attempt. PAYMENT_FAILED -> PENDING_PAYMENT is not here:
# it is only allowed for a newer attempt (PaymentRetryAccepted). NEEDS_RECONCILIATION may
# still settle when a late outcome (a janitor's finding) arrives.
_ALLOWED: dict[Status, frozenset[Status]] = {
    "PENDING_PAYMENT": frozenset({"PAYMENT_AUTHORIZED", "PAYMENT_FAILED", "NEEDS_RECONCILIATION"}),
    "PAYMENT_AUTHORIZED": frozenset(
        {"INVENTORY_RESERVED", "PAYMENT_FAILED", "REFUND_PENDING", "NEEDS_RECONCILIATION"}
    ),
    "INVENTORY_RESERVED": frozenset({"PAID_CONFIRMED", "PAYMENT_FAILED", "NEEDS_RECONCILIATION"}),
    "PAYMENT_FAILED": frozenset({"NEEDS_RECONCILIATION"}),
    "REFUND_PENDING": frozenset({"REFUNDED", "NEEDS_RECONCILIATION"}),
    "NEEDS_RECONCILIATION": frozenset({"PAID_CONFIRMED", "PAYMENT_FAILED", "REFUNDED"}),
    "PAID_CONFIRMED": frozenset(),
    "REFUNDED": frozenset(),
}


def _allowed(view: OrderView, status: Status) -> bool:
    """`_ALLOWED`, plus one move: an attempt flagged only because a record of it was
    dead-lettered (payments' `record_dead_lettered`) before any payment of it was
    accepted may still be authorized — the dead letter, replayed, can be the payment.
    Once the attempt has a transaction, that would be a move backwards."""
    if status in _ALLOWED[view.status]:
        return True
    return (
        view.status == "NEEDS_RECONCILIATION"
        and view.reason == "record_dead_lettered"
        and status == "PAYMENT_AUTHORIZED"
        and view.transaction_id is None
    )


def _failed_then_flagged(view: OrderView) -> bool:
    """The attempt reached PAYMENT_FAILED (its failure was notified), then was flagged —
    e.g. the void of its authorization failed (CompensationFailed, ``void_failed``).
    Payments accepts a retry only after the attempt's published PAYMENT_FAILED, and the
    flag comes on another topic, so payments may have accepted one before the flag
    reached it: the retry opens the next attempt exactly as it does when it arrives
    first (the older attempt's flag is then stale). Refusing it would leave the new
    attempt's money where no status shows it. The failed void stays an operator's item
    either way: reconcile names it (``compensation_failed``) whatever the status shows."""
    return view.status == "NEEDS_RECONCILIATION" and any(
        (view.attempt, kind) in view.notified for kind in ("payment_failed", "out_of_stock")
    )


# Events of the saga topics that drive no status (they are still applied for the gate).
_NOT_STATUS_BEARING = frozenset(
    {"StockReleased", "StockCommitted", "AuthorizationExpired", "AuditRecorded"}
)
_NO_STATUS = "no_status"
_UNKNOWN_EVENT = "unknown_event_type"


def _target(event_type: str, p: Mapping[str, Any]) -> tuple[Status, str | None] | str:
    """The (status, reason) an event drives, or `_NO_STATUS` / `_UNKNOWN_EVENT`."""
    match event_type:
        case "OrderRegistered":
            return "PENDING_PAYMENT", None
        case "PaymentRetryAccepted":
            return "PENDING_PAYMENT", "payment_retry"
        case "PaymentAccepted":
            return "PAYMENT_AUTHORIZED", None
        case "PaymentDeclined":
            return "PAYMENT_FAILED", reason_code(p["failure_code"])
        case "StockReserved":
            return "INVENTORY_RESERVED", None
        case "StockReservationFailed":
            # authorization flow: the void that follows decides (AuthorizationVoided).
            return ("REFUND_PENDING", "out_of_stock") if p["flow"] == "sale" else _NO_STATUS
        case "PaymentCaptured" | "SaleConfirmed":
            return "PAID_CONFIRMED", None
        case "CaptureDeclined":
            return "PAYMENT_FAILED", "capture_declined"
        case "AuthorizationVoided":
            # After capture_declined the order is already PAYMENT_FAILED.
            if p["reason"] in ("out_of_stock", "authorization_expired"):
                return "PAYMENT_FAILED", p["reason"]
            return _NO_STATUS
        case "RefundSucceeded":
            return "REFUNDED", p["reason"]
        case "CaptureFailed":
            return "NEEDS_RECONCILIATION", "capture_failed"
        case "CompensationFailed":
            return "NEEDS_RECONCILIATION", f"{p['action']}_failed"
        case "OrderFlaggedForReconciliation":
            return "NEEDS_RECONCILIATION", p["reason"]
        case "PaymentRequestRefused":
            return "PAYMENT_FAILED", reason_code(p["failure_code"])
        case "PaymentRequestFailed":
            return "NEEDS_RECONCILIATION", "payment_request_failed"
    return _NO_STATUS if event_type in _NOT_STATUS_BEARING else _UNKNOWN_EVENT


def _notification_kind(status: Status, reason: str | None) -> NotificationKind | None:
    if status == "PAID_CONFIRMED":
        return "payment_confirmed"
    if status == "PAYMENT_FAILED":
        return "out_of_stock" if reason == "out_of_stock" else "payment_failed"
    if status == "REFUNDED":
        return "refunded"
    return None


def _change(view: OrderView, previous: Status | None) -> StatusChange:
    return StatusChange(
        order_id=view.order_id,
        status=view.status,
        previous_status=previous,
        reason=view.reason,
        payment_intent_id=view.payment_intent_id,
        transaction_id=view.transaction_id,
        amount=view.amount,
        currency=view.currency,
        version=view.version,
    )


def decide(view: OrderView | None, event_type: str, payload: Mapping[str, Any]) -> Outcome:
    """Apply one saga event (already released by the causal gate) to an order's view.

    Ignored, with `ignored_reason` and the view unchanged: `unknown_event_type`,
    `unknown_order` (no OrderRegistered yet), `already_registered`, `stale_attempt` (an
    event of an older attempt, or a retry that is not newer), `unknown_attempt` (an event
    of a newer attempt that no PaymentRetryAccepted opened) and `transition_not_allowed`
    (a backwards, repeated or terminal-leaving move). A change bumps `version` by one and
    may carry the attempt's single notification of its kind.
    """
    if event_type == "PaymentIntentCreated":
        return _intent_created(view, payload)
    target = _target(event_type, payload)
    if target == _NO_STATUS:
        return Outcome(view)
    if isinstance(target, str):
        return Outcome(view, ignored_reason=target)
    status, reason = target
    if event_type == "OrderRegistered":
        if view is not None:
            return Outcome(view, ignored_reason="already_registered")
        created = OrderView(
            order_id=payload["order_id"],
            customer_id=payload["customer_id"],
            status=status,
            reason=reason,
            attempt=payload["attempt"],
            amount=payload["amount"],
            currency=payload["currency"],
            payment_intent_id=payload["payment_intent_id"],
            transaction_id=None,
            version=1,
            notified=frozenset(),
            conference_id=payload.get("conference_id"),
        )
        return Outcome(created, _change(created, None))
    if view is None:
        return Outcome(None, ignored_reason="unknown_order")

    attempt: int = payload["attempt"]
    retry = event_type == "PaymentRetryAccepted"
    ignored: str | None = None
    if retry:
        if attempt <= view.attempt:
            ignored = "stale_attempt"
        elif view.status != "PAYMENT_FAILED" and not _failed_then_flagged(view):
            ignored = "transition_not_allowed"
    elif attempt < view.attempt:
        ignored = "stale_attempt"
    elif attempt > view.attempt:
        ignored = "unknown_attempt"
    elif not _allowed(view, status):
        ignored = "transition_not_allowed"
    if ignored is not None:
        return Outcome(view, ignored_reason=ignored)

    new = replace(
        view,
        status=status,
        reason=reason,
        attempt=attempt,
        payment_intent_id=payload.get("payment_intent_id", view.payment_intent_id),
        # A retry opens an attempt with no transaction yet.
        transaction_id=None if retry else payload.get("transaction_id", view.transaction_id),
        version=view.version + 1,
    )
    notification = None
    kind = _notification_kind(status, reason)
    if kind is not None and (attempt, kind) not in view.notified:
        new = replace(new, notified=view.notified | {(attempt, kind)})
        notification = Notification(
            order_id=new.order_id,
            customer_id=new.customer_id,
            kind=kind,
            status=status,
            reason=reason,
            amount=new.amount,
            currency=new.currency,
        )
    return Outcome(new, _change(new, view.status), notification)


def _intent_created(view: OrderView | None, payload: Mapping[str, Any]) -> Outcome:
    """The requested payment of the current attempt got its intent: the view shows it
    (the status API; the next status change carries it). No status change."""
    if view is None:
        return Outcome(None, ignored_reason="unknown_order")
    if payload["attempt"] != view.attempt:
        return Outcome(view, ignored_reason="stale_attempt")
    return Outcome(replace(view, payment_intent_id=payload["payment_intent_id"]))


# --- causal gate ------------------------------------------------------------------


def is_ready(saga_seq: int | None, causation_id: str | None, applied_ids: AbstractSet[str]) -> bool:
    """Whether an event may be applied now: a root (`saga_seq` None or 1, applied in topic
    order) or an event whose cause was already applied for this order. `applied_ids` must
    hold every applied event of the order, status-bearing or not, since any of them can
    be a cause."""
    return saga_seq is None or saga_seq <= 1 or causation_id in applied_ids


def release_order(
    early: Sequence[tuple[int, str, str | None]], applied_ids: AbstractSet[str]
) -> list[str]:
    """Event ids of the `early` events (saga_seq, event_id, causation_id) that become
    applicable,
    in the order to apply them: by saga_seq (arrival order among equals), each after
    its cause, repeating until nothing more is released. Already applied ids are skipped."""
    applied = set(applied_ids)
    pending = sorted(early, key=lambda event: event[0])
    released: list[str] = []
    progress = True
    while progress:
        progress = False
        for event in list(pending):
            saga_seq, event_id, causation_id = event
            if event_id in applied:
                pending.remove(event)
            elif is_ready(saga_seq, causation_id, applied):
                pending.remove(event)
                applied.add(event_id)
                released.append(event_id)
                progress = True
    return released
