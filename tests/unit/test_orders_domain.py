"""Unit tests of services/orders/domain.py: the status projection, notifications and the
causal gate (pure; no infrastructure)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.orders.domain import (
    Notification,
    OrderView,
    Outcome,
    decide,
    is_ready,
    release_order,
)

ORDER_ID = "ord_1"
AMOUNT = 10345
ITEMS = [{"sku": "TICKET-A", "quantity": 2}]


def event(event_type: str, attempt: int = 1, flow: str = "sale", **extra: Any) -> dict[str, Any]:
    """A payload shaped as docs/saga-events.md says for `event_type`."""
    intent = f"pi_{attempt}"
    base = {"order_id": ORDER_ID, "attempt": attempt}
    money = {"amount": AMOUNT, "currency": "EUR"}
    ctx = {
        **base,
        "payment_intent_id": intent,
        "transaction_id": f"txn_{attempt}",
        "flow": flow,
        **money,
        "gateway": "simgw",
    }
    payload: dict[str, Any]
    match event_type:
        case "OrderRegistered":
            payload = {**base, "customer_id": "cus_1", **money, "payment_intent_id": intent}
        case "PaymentRetryAccepted":
            payload = {
                **base,
                "customer_id": "cus_1",
                **money,
                "payment_intent_id": intent,
                "payment_method": "wallet",
            }
        case "PaymentAccepted":
            payload = {
                **ctx,
                "customer_id": "cus_1",
                "items": ITEMS,
                "payment_method_type": "card",
                "brand": "visa",
                "last4": "4242",
            }
        case "PaymentDeclined":
            payload = {
                **base,
                "customer_id": "cus_1",
                "payment_intent_id": intent,
                "transaction_id": f"txn_{attempt}",
                **money,
                "failure_code": "card_declined",
                "failure_message": "The card was declined.",
            }
        case "OrderFlaggedForReconciliation":
            payload = {**base, "reason": "duplicate_capture"}
        case "StockReserved" | "StockCommitted":
            payload = {**ctx, "items": ITEMS}
        case "StockReservationFailed":
            payload = {**ctx, "short_skus": ["TICKET-A"]}
        case "StockReleased":
            payload = {**ctx, "items": ITEMS, "reason": "capture_declined"}
        case "PaymentCaptured":
            payload = {**ctx, "capture_id": "cap_1"}
        case "CaptureDeclined":
            payload = {**ctx, "decline_code": "insufficient_funds"}
        case "CaptureFailed":
            payload = {**ctx, "reason": "gateway_unavailable"}
        case "AuthorizationVoided":
            payload = {**ctx, "reason": "out_of_stock"}
        case "RefundSucceeded":
            payload = {**ctx, "refund_id": "re_1", "reason": "out_of_stock"}
        case "CompensationFailed":
            payload = {**ctx, "action": "refund", "reason": "refund_declined"}
        case "AuditRecorded":
            payload = {"subject": "confirmation", "action": "x", "outcome": "y", "reason": None}
        case _:
            payload = dict(ctx)
    return {**payload, **extra}


def ev(event_type: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    return event_type, event(event_type, **kwargs)


@dataclass
class Run:
    """The result of applying events in order: the final view and every outcome."""

    view: OrderView | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    def apply(self, event_type: str, payload: dict[str, Any]) -> Outcome:
        outcome = decide(self.view, event_type, payload)
        self.view = outcome.view
        self.outcomes.append(outcome)
        return outcome

    @property
    def statuses(self) -> list[str]:
        return [o.change.status for o in self.outcomes if o.change is not None]

    @property
    def versions(self) -> list[int]:
        return [o.change.version for o in self.outcomes if o.change is not None]

    @property
    def notifications(self) -> list[Notification]:
        return [o.notification for o in self.outcomes if o.notification is not None]


def run(*events: tuple[str, dict[str, Any]]) -> Run:
    result = Run()
    for event_type, payload in events:
        result.apply(event_type, payload)
    return result


def notified(result: Run) -> list[tuple[str, str, str | None]]:
    return [(n.kind, n.status, n.reason) for n in result.notifications]


AUTHORIZATION_HAPPY = [
    ev("OrderRegistered"),
    ev("PaymentAccepted", flow="authorization"),
    ev("StockReserved", flow="authorization"),
    ev("PaymentCaptured", flow="authorization"),
    ev("StockCommitted", flow="authorization"),
]
SALE_HAPPY = [
    ev("OrderRegistered"),
    ev("PaymentAccepted"),
    ev("StockReserved"),
    ev("SaleConfirmed"),
    ev("StockCommitted"),
]


# --- happy paths ----------------------------------------------------------------


def test_authorization_flow_reaches_paid_confirmed() -> None:
    result = run(*AUTHORIZATION_HAPPY)
    assert result.statuses == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert result.versions == [1, 2, 3, 4]
    assert result.outcomes[-1] == Outcome(result.view)  # StockCommitted drives no status
    assert result.view == OrderView(
        order_id=ORDER_ID,
        customer_id="cus_1",
        status="PAID_CONFIRMED",
        reason=None,
        attempt=1,
        amount=AMOUNT,
        currency="EUR",
        payment_intent_id="pi_1",
        transaction_id="txn_1",
        version=4,
        notified=frozenset({(1, "payment_confirmed")}),
    )
    assert result.notifications == [
        Notification(
            order_id=ORDER_ID,
            customer_id="cus_1",
            kind="payment_confirmed",
            status="PAID_CONFIRMED",
            reason=None,
            amount=AMOUNT,
            currency="EUR",
        )
    ]


def test_sale_flow_reaches_paid_confirmed() -> None:
    result = run(*SALE_HAPPY)
    assert result.statuses == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert result.versions == [1, 2, 3, 4]
    assert notified(result) == [("payment_confirmed", "PAID_CONFIRMED", None)]


def test_status_changes_carry_the_contract_payload() -> None:
    result = run(*AUTHORIZATION_HAPPY[:2])
    first, second = (o.change for o in result.outcomes)
    assert first is not None
    assert second is not None
    assert asdict(first) == {
        "order_id": ORDER_ID,
        "status": "PENDING_PAYMENT",
        "previous_status": None,
        "reason": None,
        "payment_intent_id": "pi_1",
        "transaction_id": None,
        "amount": AMOUNT,
        "currency": "EUR",
        "version": 1,
    }
    assert asdict(second) == {
        "order_id": ORDER_ID,
        "status": "PAYMENT_AUTHORIZED",
        "previous_status": "PENDING_PAYMENT",
        "reason": None,
        "payment_intent_id": "pi_1",
        "transaction_id": "txn_1",
        "amount": AMOUNT,
        "currency": "EUR",
        "version": 2,
    }


# --- compensation and failure paths -------------------------------------------------


def test_gateway_decline_fails_the_payment() -> None:
    result = run(ev("OrderRegistered"), ev("PaymentDeclined"))
    assert result.statuses == ["PENDING_PAYMENT", "PAYMENT_FAILED"]
    assert result.view is not None
    assert (result.view.reason, result.view.transaction_id, result.view.version) == (
        "card_declined",
        "txn_1",
        2,
    )
    assert notified(result) == [("payment_failed", "PAYMENT_FAILED", "card_declined")]


@pytest.mark.parametrize(
    ("failure_code", "reason"),
    [("Do-Not-Honor", "do_not_honor"), ("05", "payment_declined"), (None, None)],
)
def test_decline_reason_is_a_snake_case_code(failure_code: str | None, reason: str | None) -> None:
    result = run(ev("OrderRegistered"), ev("PaymentDeclined", failure_code=failure_code))
    assert result.view is not None
    assert result.view.reason == reason
    assert notified(result) == [("payment_failed", "PAYMENT_FAILED", reason)]


def test_out_of_stock_authorization_is_voided_and_fails_as_out_of_stock() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentAccepted", flow="authorization"),
        ev("StockReservationFailed", flow="authorization"),
        ev("AuthorizationVoided", flow="authorization", reason="out_of_stock"),
    )
    assert result.outcomes[2] == Outcome(result.outcomes[1].view)  # the void decides
    assert result.statuses == ["PENDING_PAYMENT", "PAYMENT_AUTHORIZED", "PAYMENT_FAILED"]
    assert result.versions == [1, 2, 3]
    assert result.view is not None
    assert result.view.reason == "out_of_stock"
    assert notified(result) == [("out_of_stock", "PAYMENT_FAILED", "out_of_stock")]


def test_out_of_stock_sale_is_refunded() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentAccepted"),
        ev("StockReservationFailed"),
        ev("RefundSucceeded"),
    )
    assert result.statuses == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "REFUND_PENDING",
        "REFUNDED",
    ]
    assert result.outcomes[2].change is not None
    assert result.outcomes[2].change.reason == "out_of_stock"
    assert result.outcomes[2].notification is None  # the refund is the outcome
    assert notified(result) == [("refunded", "REFUNDED", "out_of_stock")]


def test_declined_capture_fails_then_release_and_void_change_nothing() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentAccepted", flow="authorization"),
        ev("StockReserved", flow="authorization"),
        ev("CaptureDeclined", flow="authorization"),
        ev("StockReleased", flow="authorization"),
        ev("AuthorizationVoided", flow="authorization", reason="capture_declined"),
    )
    assert result.statuses[-1] == "PAYMENT_FAILED"
    assert result.versions == [1, 2, 3, 4]
    assert result.view is not None
    assert result.view.reason == "capture_declined"
    assert [o.ignored_reason for o in result.outcomes[-2:]] == [None, None]
    assert [o.change for o in result.outcomes[-2:]] == [None, None]
    assert notified(result) == [("payment_failed", "PAYMENT_FAILED", "capture_declined")]


def test_expired_authorization_fails_after_the_void() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentAccepted", flow="authorization"),
        ev("StockReserved", flow="authorization"),
        ev("AuthorizationExpired", flow="authorization"),
        ev("StockReleased", flow="authorization", reason="authorization_expired"),
        ev("AuthorizationVoided", flow="authorization", reason="authorization_expired"),
    )
    assert result.statuses[-2:] == ["INVENTORY_RESERVED", "PAYMENT_FAILED"]
    assert result.versions == [1, 2, 3, 4]
    assert result.view is not None
    assert result.view.reason == "authorization_expired"
    assert notified(result) == [("payment_failed", "PAYMENT_FAILED", "authorization_expired")]


def test_failed_capture_needs_reconciliation_without_notifying() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentAccepted", flow="authorization"),
        ev("StockReserved", flow="authorization"),
        ev("CaptureFailed", flow="authorization"),
    )
    assert result.statuses[-1] == "NEEDS_RECONCILIATION"
    assert result.view is not None
    assert result.view.reason == "capture_failed"
    assert result.notifications == []


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        (
            [
                ev("PaymentAccepted", flow="authorization"),
                ev("StockReservationFailed", flow="authorization"),
                ev("CompensationFailed", flow="authorization", action="void"),
            ],
            "void_failed",
        ),
        (
            [ev("PaymentAccepted"), ev("StockReservationFailed"), ev("CompensationFailed")],
            "refund_failed",
        ),
        (
            [
                ev("PaymentAccepted", flow="authorization"),
                ev("StockReserved", flow="authorization"),
                ev("CaptureDeclined", flow="authorization"),
                ev("CompensationFailed", flow="authorization", action="void"),
            ],
            "void_failed",
        ),
    ],
)
def test_failed_compensation_needs_reconciliation(
    events: list[tuple[str, dict[str, Any]]], reason: str
) -> None:
    result = run(ev("OrderRegistered"), *events)
    assert result.statuses[-1] == "NEEDS_RECONCILIATION"
    assert result.view is not None
    assert result.view.reason == reason
    assert result.versions == list(range(1, len(result.versions) + 1))


def test_flagged_order_needs_reconciliation() -> None:
    result = run(ev("OrderRegistered"), ev("OrderFlaggedForReconciliation"))
    assert result.statuses == ["PENDING_PAYMENT", "NEEDS_RECONCILIATION"]
    assert result.view is not None
    assert result.view.reason == "duplicate_capture"


def test_dead_lettered_record_flag_is_lifted_by_the_replayed_payment() -> None:
    """Payments flagged the order because a genuine confirmation was dead-lettered; the
    replayed confirmation authorizes the same attempt and the saga proceeds."""
    result = run(
        ev("OrderRegistered"),
        ev("OrderFlaggedForReconciliation", reason="record_dead_lettered"),
        *AUTHORIZATION_HAPPY[1:],
    )
    assert result.statuses == [
        "PENDING_PAYMENT",
        "NEEDS_RECONCILIATION",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert result.view is not None
    assert result.view.transaction_id == "txn_1"


@pytest.mark.parametrize(
    ("done", "reason"),
    [
        ([], "duplicate_capture"),  # flagged for another reason: an operator must act
        (["PaymentAccepted"], "record_dead_lettered"),  # this attempt was authorized
        (["PaymentDeclined"], "record_dead_lettered"),  # this attempt was declined
    ],
)
def test_reconciliation_is_not_left_for_authorized_otherwise(done: list[str], reason: str) -> None:
    result = run(
        ev("OrderRegistered"),
        *(ev(name) for name in done),
        ev("OrderFlaggedForReconciliation", reason=reason),
    )
    assert result.statuses[-1] == "NEEDS_RECONCILIATION"
    before = result.view
    outcome = result.apply(*ev("PaymentAccepted"))
    assert outcome == Outcome(before, ignored_reason="transition_not_allowed")


def test_reconciliation_settles_when_the_capture_is_found_after_all() -> None:
    result = run(
        *AUTHORIZATION_HAPPY[:3],
        ev("CaptureFailed", flow="authorization"),
        ev("PaymentCaptured", flow="authorization"),
    )
    assert result.statuses[-2:] == ["NEEDS_RECONCILIATION", "PAID_CONFIRMED"]
    assert result.versions == [1, 2, 3, 4, 5]
    assert notified(result) == [("payment_confirmed", "PAID_CONFIRMED", None)]


# --- retries ----------------------------------------------------------------------


def test_retry_after_a_decline_opens_a_new_attempt_that_can_succeed() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentDeclined"),
        ev("PaymentRetryAccepted", attempt=2),
        ev("PaymentAccepted", attempt=2),
        ev("StockReserved", attempt=2),
        ev("SaleConfirmed", attempt=2),
    )
    assert result.statuses == [
        "PENDING_PAYMENT",
        "PAYMENT_FAILED",
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert result.versions == [1, 2, 3, 4, 5, 6]
    retry = result.outcomes[2].change
    assert retry is not None
    assert (retry.reason, retry.payment_intent_id, retry.transaction_id) == (
        "payment_retry",
        "pi_2",
        None,
    )
    assert result.view is not None
    assert (result.view.attempt, result.view.transaction_id) == (2, "txn_2")
    assert notified(result) == [
        ("payment_failed", "PAYMENT_FAILED", "card_declined"),
        ("payment_confirmed", "PAID_CONFIRMED", None),
    ]
    assert result.view.notified == {(1, "payment_failed"), (2, "payment_confirmed")}


def test_each_attempt_gets_its_own_failure_notification() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentDeclined"),
        ev("PaymentRetryAccepted", attempt=2),
        ev("PaymentDeclined", attempt=2),
    )
    assert [n.kind for n in result.notifications] == ["payment_failed", "payment_failed"]


def test_a_retry_opens_the_next_attempt_of_a_failed_attempt_flagged_later() -> None:
    """Payments accepts a retry on the published PAYMENT_FAILED; the void's
    CompensationFailed (another topic) may reach the projection first. The retry must
    still open attempt 2, as it does in the other order, or its money is never shown."""
    result = run(
        ev("OrderRegistered", flow="authorization"),
        ev("PaymentAccepted", flow="authorization"),
        ev("StockReserved", flow="authorization"),
        ev("CaptureDeclined", flow="authorization"),
        ev("CompensationFailed", flow="authorization", action="void", reason="declined"),
    )
    assert result.statuses[-2:] == ["PAYMENT_FAILED", "NEEDS_RECONCILIATION"]
    outcome = result.apply(*ev("PaymentRetryAccepted", attempt=2))
    assert outcome.view is not None
    assert (outcome.view.status, outcome.view.attempt) == ("PENDING_PAYMENT", 2)


def test_a_retry_is_refused_when_the_flagged_attempt_never_failed() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("OrderFlaggedForReconciliation", reason="record_dead_lettered"),
    )
    before = result.view
    outcome = result.apply(*ev("PaymentRetryAccepted", attempt=2))
    assert outcome == Outcome(before, ignored_reason="transition_not_allowed")


def test_events_of_an_older_attempt_are_ignored() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentDeclined"),
        ev("PaymentRetryAccepted", attempt=2),
    )
    before = result.view
    for event_type in ("PaymentAccepted", "PaymentDeclined", "OrderFlaggedForReconciliation"):
        outcome = result.apply(*ev(event_type, attempt=1))
        assert outcome == Outcome(before, ignored_reason="stale_attempt")


@pytest.mark.parametrize(
    "events",
    [
        [],  # PENDING_PAYMENT
        [ev("PaymentAccepted")],
        SALE_HAPPY[1:],  # PAID_CONFIRMED
        [ev("PaymentAccepted"), ev("StockReservationFailed"), ev("RefundSucceeded")],
    ],
)
def test_retry_is_only_applied_after_a_failure(events: list[tuple[str, dict[str, Any]]]) -> None:
    result = run(ev("OrderRegistered"), *events)
    before = result.view
    outcome = result.apply(*ev("PaymentRetryAccepted", attempt=2))
    assert outcome == Outcome(before, ignored_reason="transition_not_allowed")


def test_retry_that_is_not_newer_is_stale() -> None:
    result = run(ev("OrderRegistered"), ev("PaymentDeclined"))
    outcome = result.apply(*ev("PaymentRetryAccepted", attempt=1))
    assert outcome.ignored_reason == "stale_attempt"
    assert outcome.change is None


def test_event_of_an_attempt_not_yet_opened_is_ignored() -> None:
    result = run(ev("OrderRegistered"))
    outcome = result.apply(*ev("PaymentAccepted", attempt=2))
    assert outcome.ignored_reason == "unknown_attempt"
    assert outcome.view == result.outcomes[0].view


# --- guards -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "late",
    [
        "PaymentAccepted",
        "StockReserved",
        "PaymentDeclined",
        "CaptureDeclined",
        "CaptureFailed",
        "OrderFlaggedForReconciliation",
        "SaleConfirmed",
        "PaymentCaptured",
    ],
)
def test_paid_confirmed_never_moves(late: str) -> None:
    result = run(*SALE_HAPPY)
    before = result.view
    outcome = result.apply(*ev(late))
    assert outcome == Outcome(before, ignored_reason="transition_not_allowed")


@pytest.mark.parametrize(
    "late", ["PaymentAccepted", "StockReservationFailed", "RefundSucceeded", "CompensationFailed"]
)
def test_refunded_never_moves(late: str) -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentAccepted"),
        ev("StockReservationFailed"),
        ev("RefundSucceeded"),
    )
    before = result.view
    assert result.apply(*ev(late)) == Outcome(before, ignored_reason="transition_not_allowed")


@pytest.mark.parametrize(
    ("done", "late"),
    [
        (["PaymentAccepted", "StockReserved"], "PaymentAccepted"),
        (["PaymentAccepted", "StockReserved"], "StockReserved"),
        (["PaymentAccepted"], "PaymentAccepted"),
        (["PaymentDeclined"], "PaymentAccepted"),
        (["PaymentAccepted", "StockReservationFailed"], "StockReserved"),
    ],
)
def test_backwards_or_repeated_moves_are_ignored(done: list[str], late: str) -> None:
    result = run(ev("OrderRegistered"), *(ev(name) for name in done))
    before = result.view
    assert result.apply(*ev(late)) == Outcome(before, ignored_reason="transition_not_allowed")


def test_event_before_registration_is_ignored() -> None:
    assert decide(None, *ev("PaymentAccepted")) == Outcome(None, ignored_reason="unknown_order")


def test_second_registration_is_ignored() -> None:
    result = run(ev("OrderRegistered"), ev("PaymentAccepted"))
    before = result.view
    outcome = result.apply(*ev("OrderRegistered"))
    assert outcome == Outcome(before, ignored_reason="already_registered")


@pytest.mark.parametrize(
    "event_type", ["StockReleased", "StockCommitted", "AuthorizationExpired", "AuditRecorded"]
)
def test_events_that_drive_no_status_change_nothing(event_type: str) -> None:
    result = run(*SALE_HAPPY[:3])
    before = result.view
    assert result.apply(*ev(event_type)) == Outcome(before)
    assert decide(None, *ev(event_type)) == Outcome(None)


def test_unknown_event_type_is_ignored_with_a_reason() -> None:
    result = run(ev("OrderRegistered"))
    outcome = result.apply("SomethingNew", {"order_id": ORDER_ID})
    assert outcome == Outcome(result.outcomes[0].view, ignored_reason="unknown_event_type")


# --- notifications exactly once ---------------------------------------------------


@pytest.mark.parametrize("repeat", [2, 5])
def test_repeated_outcome_events_notify_once(repeat: int) -> None:
    result = run(*SALE_HAPPY, *[ev("SaleConfirmed")] * repeat, *[ev("PaymentCaptured")] * repeat)
    assert [n.kind for n in result.notifications] == ["payment_confirmed"]
    assert result.view is not None
    assert result.view.version == 4


def test_repeated_declines_notify_once() -> None:
    result = run(ev("OrderRegistered"), *[ev("PaymentDeclined")] * 3)
    assert [n.kind for n in result.notifications] == ["payment_failed"]


def test_an_outcome_reached_again_after_reconciliation_is_not_renotified() -> None:
    result = run(
        ev("OrderRegistered"),
        ev("PaymentDeclined"),
        ev("OrderFlaggedForReconciliation"),
        ev("AuthorizationVoided", reason="authorization_expired"),
    )
    assert result.statuses[-1] == "PAYMENT_FAILED"
    assert result.versions == [1, 2, 3, 4]
    assert [n.kind for n in result.notifications] == ["payment_failed"]


ANY_EVENT = st.sampled_from(
    [
        ev(name, attempt=attempt, flow=flow, **extra)
        for attempt in (1, 2)
        for flow in ("authorization", "sale")
        for name, extra in [
            ("PaymentRetryAccepted", {}),
            ("PaymentAccepted", {}),
            ("PaymentDeclined", {}),
            ("OrderFlaggedForReconciliation", {}),
            ("OrderFlaggedForReconciliation", {"reason": "record_dead_lettered"}),
            ("StockReserved", {}),
            ("StockReservationFailed", {}),
            ("StockReleased", {}),
            ("PaymentCaptured", {}),
            ("SaleConfirmed", {}),
            ("CaptureDeclined", {}),
            ("CaptureFailed", {}),
            ("AuthorizationVoided", {"reason": "out_of_stock"}),
            ("AuthorizationVoided", {"reason": "capture_declined"}),
            ("AuthorizationVoided", {"reason": "authorization_expired"}),
            ("RefundSucceeded", {}),
            ("CompensationFailed", {}),
        ]
    ]
)


@given(events=st.lists(ANY_EVENT, max_size=30))
def test_invariants_hold_for_any_event_sequence(events: list[tuple[str, dict[str, Any]]]) -> None:
    result = run(ev("OrderRegistered"))
    sent: set[tuple[int, str]] = set()
    authorized: set[int] = set()
    for event_type, payload in events:
        before = result.view
        assert before is not None
        outcome = result.apply(event_type, payload)
        if outcome.change is None:
            assert outcome.view == before
            assert outcome.notification is None
            continue
        assert outcome.change.version == before.version + 1
        assert outcome.change.previous_status == before.status
        assert before.status not in ("PAID_CONFIRMED", "REFUNDED")
        assert payload["attempt"] >= before.attempt
        if outcome.change.status == "PAYMENT_AUTHORIZED":  # never twice in one attempt
            assert payload["attempt"] not in authorized
            authorized.add(payload["attempt"])
        if outcome.notification is not None:
            key = (payload["attempt"], outcome.notification.kind)
            assert key not in sent
            sent.add(key)
    assert result.view is not None
    assert result.view.notified == sent


# --- causal gate ------------------------------------------------------------------


def test_roots_are_always_ready() -> None:
    assert is_ready(None, None, frozenset())
    assert is_ready(1, "external_record", frozenset())


def test_non_roots_wait_for_their_cause() -> None:
    assert not is_ready(2, "e1", frozenset())
    assert not is_ready(2, None, frozenset({"e1"}))
    assert is_ready(2, "e1", frozenset({"e1"}))


def test_release_follows_the_chain_to_a_fixed_point() -> None:
    held = [(4, "e4", "e3"), (2, "e2", "e1"), (3, "e3", "e2")]
    assert release_order(held, frozenset({"e1"})) == ["e2", "e3", "e4"]


def test_release_stops_at_a_missing_link() -> None:
    held = [(3, "e3", "e2"), (4, "e4", "e3")]
    assert release_order(held, frozenset({"e1"})) == []
    held.append((2, "e2", "e1"))
    assert release_order(held, frozenset({"e1"})) == ["e2", "e3", "e4"]


def test_release_keeps_arrival_order_among_equal_seq_and_skips_applied() -> None:
    held = [(2, "b", "root"), (2, "a", "root"), (2, "done", "root")]
    assert release_order(held, frozenset({"root", "done"})) == ["b", "a"]


def test_release_iterates_when_seq_does_not_follow_causality() -> None:
    held = [(2, "x", "y"), (5, "y", "root")]
    assert release_order(held, frozenset({"root"})) == ["y", "x"]


@dataclass(frozen=True)
class SagaEvent:
    saga_seq: int
    event_id: str
    causation_id: str
    event_type: str
    payload: dict[str, Any]


def saga(*steps: tuple[int, str, str, tuple[str, dict[str, Any]]]) -> list[SagaEvent]:
    return [SagaEvent(seq, eid, cause, *event_) for seq, eid, cause, event_ in steps]


AUTHORIZATION_SAGA = saga(
    (1, "e1", "ext1", ev("OrderRegistered")),
    (1, "e2", "ext2", ev("PaymentAccepted", flow="authorization")),
    (2, "e3", "e2", ev("StockReserved", flow="authorization")),
    (3, "e4", "e3", ev("PaymentCaptured", flow="authorization")),
    (4, "e5", "e4", ev("StockCommitted", flow="authorization")),
)
CAPTURE_DECLINED_SAGA = saga(
    (1, "e1", "ext1", ev("OrderRegistered")),
    (1, "e2", "ext2", ev("PaymentAccepted", flow="authorization")),
    (2, "e3", "e2", ev("StockReserved", flow="authorization")),
    (3, "e4", "e3", ev("CaptureDeclined", flow="authorization")),
    (4, "e5", "e4", ev("StockReleased", flow="authorization")),
    (4, "e6", "e4", ev("AuthorizationVoided", flow="authorization", reason="capture_declined")),
)
SALE_OUT_OF_STOCK_SAGA = saga(
    (1, "e1", "ext1", ev("OrderRegistered")),
    (1, "e2", "ext2", ev("PaymentAccepted")),
    (2, "e3", "e2", ev("StockReservationFailed")),
    (3, "e4", "e3", ev("RefundSucceeded")),
)


def project(arrivals: list[SagaEvent]) -> Run:
    """What the orders handler does: apply ready events, hold the others, release held
    events after every applied one."""
    result = Run()
    applied: set[str] = set()
    held: dict[str, SagaEvent] = {}

    def apply(e: SagaEvent) -> None:
        result.apply(e.event_type, e.payload)
        applied.add(e.event_id)

    for e in arrivals:
        if not is_ready(e.saga_seq, e.causation_id, frozenset(applied)):
            held[e.event_id] = e
            continue
        apply(e)
        waiting = [(h.saga_seq, h.event_id, h.causation_id) for h in held.values()]
        for event_id in release_order(waiting, frozenset(applied)):
            apply(held.pop(event_id))
    assert held == {}
    return result


def test_out_of_order_arrival_is_put_back_in_causal_order() -> None:
    e1, e2, e3, e4, e5 = AUTHORIZATION_SAGA
    arrivals = [e1, e5, e4, e2, e3]  # commit and capture overtake the reservation
    naive = run(*((e.event_type, e.payload) for e in arrivals))
    assert naive.view is not None
    assert naive.view.status == "INVENTORY_RESERVED"  # what the gate prevents
    gated = project(arrivals)
    assert gated.statuses == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert gated.versions == [1, 2, 3, 4]
    assert [n.kind for n in gated.notifications] == ["payment_confirmed"]


@pytest.mark.parametrize(
    "events", [AUTHORIZATION_SAGA, CAPTURE_DECLINED_SAGA, SALE_OUT_OF_STOCK_SAGA]
)
@given(data=st.data())
def test_any_interleaving_projects_like_causal_order(
    events: list[SagaEvent], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(events))
    # Roots share the payments topic partition, so they keep their relative order.
    roots = iter([e for e in events if e.saga_seq == 1])
    arrivals = [next(roots) if e.saga_seq == 1 else e for e in shuffled]
    expected = run(*((e.event_type, e.payload) for e in events))
    gated = project(arrivals)
    assert gated.view == expected.view
    assert [o.change for o in gated.outcomes if o.change] == [
        o.change for o in expected.outcomes if o.change
    ]
    assert gated.notifications == expected.notifications
