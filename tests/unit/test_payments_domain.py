"""Unit tests of services/payments/domain.py: card-data detection and the payment
decisions (pure; no infrastructure)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.carddata import CARD_NUMBER_PRESENT, SECURITY_CODE_PRESENT, find_card_data
from schemas.envelope import event_type_of
from services.payments.domain import (
    Decision,
    decide_confirmation,
    decide_match_unmatched,
    decide_order_placed,
    decide_retry,
)
from tests.support.payments import NOW, make_confirmation, make_order

WINDOW = timedelta(hours=24)

CONTEXT_KEYS = {
    "order_id",
    "attempt",
    "payment_intent_id",
    "transaction_id",
    "flow",
    "amount",
    "currency",
    "gateway",
}
AUDIT_KEYS = {
    "subject",
    "action",
    "outcome",
    "reason",
    "order_id",
    "transaction_id",
    "gateway_event_id",
    "details",
}


def emitted(decision: Decision) -> list[tuple[str, dict[str, Any]]]:
    """The decision's events as emitted: (event type, payload JSON)."""
    return [(event_type_of(type(e)), e.model_dump(mode="json")) for e in decision.events]


def audited(decision: Decision) -> list[dict[str, Any]]:
    """The decision's audit entries as emitted (JSON)."""
    return [a.model_dump(mode="json") for a in decision.audit]


def luhn_complete(body: str) -> str:
    """`body` plus its Luhn check digit (reference implementation, independent of the
    module under test)."""
    total = 0
    for i, char in enumerate(reversed(body)):
        d = int(char)
        if i % 2 == 0:  # doubled: every second digit counting from the check digit
            d = sum(divmod(d * 2, 10))
        total += d
    return body + str((10 - total % 10) % 10)


def luhn_ok(number: str) -> bool:
    return luhn_complete(number[:-1]) == number


# --- find_card_data: examples ---------------------------------------------------

GATEWAY_BODIES = [
    {
        "id": "evt_1Pq8ZvA4kR7sVb2mQx01",
        "type": "payment.authorized",
        "created": 1795341601,
        "data": {
            "transaction_id": "txn_1Pq8ZuA4kR7sVb2m",
            "payment_intent_id": "pi_3Q9xLk2eZvKYlo2C",
            "order_id": "ord_2026_000123",
            "amount": 10345,
            "currency": "EUR",
            "payment_method": {"type": "card", "brand": "visa", "last4": "4242"},
        },
    },
    {
        "id": "evt_1Pq8ZvA4kR7sVb2mQx03",
        "type": "payment.failed",
        "created": 1795341601,
        "data": {
            "transaction_id": "txn_1Pq8ZxC6mT9uXd4o",
            "payment_intent_id": "pi_3Q9xLk2eZvKYlo2C",
            "amount": 10345,
            "currency": "EUR",
            "payment_method": {"type": "card", "brand": "mastercard", "last4": "0341"},
            "failure_code": "card_declined",
            "failure_message": "The card was declined.",
        },
    },
]


@pytest.mark.parametrize("body", GATEWAY_BODIES)
def test_genuine_gateway_bodies_carry_no_card_data(body: dict[str, Any]) -> None:
    assert find_card_data(body) is None
    assert find_card_data(json.loads(json.dumps(body))) is None


@pytest.mark.parametrize(
    "value",
    [
        "4111111111111111",  # visa test card
        "4242 4242 4242 4242",  # typed with spaces
        "4242-4242-4242-4242",  # typed with dashes
        "378282246310005",  # amex, 15 digits
        "3782 822463 10005",  # amex grouping 4-6-5
        "6011000990139424",  # discover
        "4222222222222",  # 13 digits
        luhn_complete("630400000000000000"),  # 19 digits
        "card: 4111111111111111, exp 12/30",  # embedded in text
        "ref 12 4111 1111 1111 1111",  # an unrelated group before the card number
        "pan=4111111111111111;",
        4111111111111111,  # as a JSON number
        4111111111111111.0,  # as a JSON float
    ],
)
def test_card_numbers_are_found(value: object) -> None:
    assert find_card_data({"data": {"note": value}}) == CARD_NUMBER_PRESENT


def test_card_number_in_a_key_or_deep_list_is_found() -> None:
    assert find_card_data({"4111111111111111": "x"}) == CARD_NUMBER_PRESENT
    assert find_card_data([1, [2, [3, {"a": ["b", "4111 1111 1111 1111"]}]]]) == (
        CARD_NUMBER_PRESENT
    )


@pytest.mark.parametrize(
    "value",
    [
        "4111111111111112",  # Luhn fails
        "4111 1111 1111 1112",
        "411111111111",  # 12 digits
        "41111111111111111111111",  # a 23-digit run holds Luhn-valid windows; not a card
        "4111111111111111" + "0000",  # 20 digits
        "4111  1111  1111  1111",  # double spaces do not join groups
        "4111_1111_1111_1111",  # underscores do not join groups
        "txn_1Pq8ZuA4kR7sVb2m",
        "evt_3f0c9a8b7c6d5e4f3a2b1c0d",
        "2026-11-22T10:00:00Z",
        1795341601,  # unix seconds
        "1795341601",
        10345,  # an amount
        "+49 170 1234567",  # a phone number
        True,
        None,
        12.5,
    ],
)
def test_ordinary_values_are_not_card_numbers(value: object) -> None:
    assert find_card_data({"data": {"note": value}}) is None


@pytest.mark.parametrize(
    "key",
    [
        "cvv",
        "CVV",
        "cvc",
        "cvv2",
        "CVC2",
        "cvv_2",
        "card_number",
        "Card-Number",
        "cardNumber",
        "cardnumber",
        "pan",
        "PAN",
        "security_code",
        "securityCode",
        "security-code",
    ],
)
def test_security_code_keys_are_found_at_any_depth(key: str) -> None:
    body = {"data": {"payment_method": [{"type": "card", key: "***"}]}}
    assert find_card_data(body) == SECURITY_CODE_PRESENT
    assert find_card_data({key: None}) == SECURITY_CODE_PRESENT


@pytest.mark.parametrize("key", ["span", "company", "pan_id", "cvv_hint", "last4", "brand"])
def test_keys_that_merely_contain_a_sensitive_word_are_fine(key: str) -> None:
    assert find_card_data({key: "x"}) is None


def test_card_number_takes_precedence_over_security_code_key() -> None:
    body = {"cvv": "123", "data": {"x": "4111111111111111"}}
    assert find_card_data(body) == CARD_NUMBER_PRESENT


def test_reason_never_carries_the_value() -> None:
    result = find_card_data({"n": "4111111111111111", "cvv": "987"})
    assert result is not None
    assert "4111" not in result
    assert "987" not in result


def test_deep_nesting_does_not_hit_the_recursion_limit() -> None:
    node: object = "4111111111111111"
    for _ in range(20_000):
        node = [node]
    assert find_card_data(node) == CARD_NUMBER_PRESENT


@pytest.mark.parametrize(
    "value",
    [
        "evt_4194986994504da1daa0004f",  # a 13-digit Luhn-valid run inside a hex id
        "txn_a4242424242424242b",
        "ref4111111111111111",
    ],
)
def test_digits_inside_an_identifier_are_not_card_numbers(value: str) -> None:
    assert find_card_data({"id": value}) is None


@pytest.mark.parametrize(
    "value", ["pan=4242424242424242", "(4242424242424242)", "#4242424242424242"]
)
def test_a_card_number_next_to_punctuation_is_found(value: str) -> None:
    assert find_card_data({"note": value}) == CARD_NUMBER_PRESENT


# --- find_card_data: properties ---------------------------------------------------

SAFE_TEXT = st.text(alphabet=st.characters(exclude_categories=["Nd"]), max_size=12)
SAFE_KEY = SAFE_TEXT.map(lambda text: "k_" + text)  # never a sensitive key
SAFE_LEAF = st.none() | st.booleans() | st.integers(-(10**9), 10**9) | SAFE_TEXT
SAFE_JSON = st.recursive(
    SAFE_LEAF,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(SAFE_KEY, children, max_size=3)
    ),
    max_leaves=8,
)
# Where to put a value: wrap it in lists (at an index among safe siblings) or dicts.
WRAPPERS = st.lists(
    st.tuples(st.sampled_from(["list", "dict"]), st.lists(SAFE_JSON, max_size=3), SAFE_KEY),
    max_size=5,
)


def embed(value: object, wrappers: list[tuple[str, list[object], str]], index: int) -> object:
    for kind, siblings, key in wrappers:
        if kind == "list":
            at = index % (len(siblings) + 1)
            value = [*siblings[:at], value, *siblings[at:]]
        else:
            value = {**{f"{key}_{i}": s for i, s in enumerate(siblings)}, key: value}
    return value


@st.composite
def luhn_numbers(draw: st.DrawFn) -> str:
    length = draw(st.integers(13, 19))
    body = draw(st.text(alphabet="0123456789", min_size=length - 1, max_size=length - 1))
    return luhn_complete(body)


@st.composite
def typed_forms(draw: st.DrawFn, number: str) -> object:
    """The number as people and systems write it: plain, grouped, inside text, or as a
    JSON number."""
    form = draw(st.sampled_from(["plain", "grouped", "text", "int"]))
    if form == "int" and number[0] != "0":
        return int(number)
    if form == "grouped":
        cuts = sorted(draw(st.sets(st.integers(1, len(number) - 1), max_size=5)))
        parts = [number[a:b] for a, b in zip([0, *cuts], [*cuts, len(number)], strict=True)]
        return draw(st.sampled_from([" ", "-"])).join(parts)
    if form == "text":
        return draw(SAFE_TEXT) + " " + number + " " + draw(SAFE_TEXT)
    return number


@given(number=luhn_numbers(), data=st.data(), wrappers=WRAPPERS, index=st.integers(0, 10))
def test_any_luhn_number_anywhere_is_found(
    number: str, data: st.DataObject, wrappers: list[Any], index: int
) -> None:
    value = data.draw(typed_forms(number))
    assert find_card_data(embed(value, wrappers, index)) == CARD_NUMBER_PRESENT


@given(
    digits=st.text(alphabet="0123456789", min_size=13, max_size=19).filter(
        lambda d: not luhn_ok(d)
    ),
    prefix=SAFE_TEXT,
    wrappers=WRAPPERS,
    index=st.integers(0, 10),
)
def test_non_luhn_digit_runs_are_not_card_numbers(
    digits: str, prefix: str, wrappers: list[Any], index: int
) -> None:
    assert find_card_data(embed(prefix + digits, wrappers, index)) is None


@given(
    digits=st.text(alphabet="0123456789", min_size=1, max_size=12)
    | st.text(alphabet="0123456789", min_size=20, max_size=40),
    wrappers=WRAPPERS,
    index=st.integers(0, 10),
)
def test_runs_shorter_or_longer_than_card_numbers_are_ignored(
    digits: str, wrappers: list[Any], index: int
) -> None:
    assert find_card_data(embed("id_" + digits, wrappers, index)) is None


@given(created=st.integers(10**9, 10**10 - 1), wrappers=WRAPPERS, index=st.integers(0, 10))
def test_unix_timestamps_are_not_card_numbers(
    created: int, wrappers: list[Any], index: int
) -> None:
    body = {"id": "evt_x", "created": created, "data": {"created": str(created)}}
    assert find_card_data(embed(body, wrappers, index)) is None


@given(tree=SAFE_JSON)
def test_safe_json_is_clean(tree: object) -> None:
    assert find_card_data(tree) is None


# --- decide_order_placed --------------------------------------------------------


def test_new_order_is_registered_as_attempt_one_pending() -> None:
    incoming = make_order(attempt=7, status="failed")  # normalised, whatever the caller set
    decision = decide_order_placed(None, incoming)
    assert decision.outcome == "registered"
    assert decision.reason is None
    assert decision.order == make_order()
    assert emitted(decision) == [
        (
            "OrderRegistered",
            {
                "order_id": "ord_1",
                "attempt": 1,
                "customer_id": "cus_1",
                "amount": 10345,
                "currency": "EUR",
                "payment_intent_id": "pi_1",
                "conference_id": None,
            },
        ),
    ]
    assert audited(decision) == [
        {
            "subject": "order",
            "action": "order_placed",
            "outcome": "registered",
            "reason": None,
            "order_id": "ord_1",
            "transaction_id": None,
            "gateway_event_id": None,
            "details": {},
        },
    ]


@pytest.mark.parametrize(("conference_id", "emitted_as"), [("conf_9", "conf_9"), ("", None)])
def test_order_registered_carries_the_conference_id_if_any(
    conference_id: str, emitted_as: str | None
) -> None:
    decision = decide_order_placed(None, make_order(conference_id=conference_id))
    [(_, payload)] = emitted(decision)
    assert payload["conference_id"] == emitted_as


def test_same_order_again_is_a_duplicate_no_op() -> None:
    existing = make_order(status="accepted")
    decision = decide_order_placed(existing, make_order())
    assert decision.outcome == "duplicate"
    assert decision.order is None
    assert decision.events == ()
    assert decision.audit[0].outcome == "duplicate"


def test_same_order_id_with_different_content_is_rejected() -> None:
    decision = decide_order_placed(make_order(), make_order(content_hash="hash_2", total_amount=1))
    assert decision.outcome == "rejected"
    assert decision.reason == "order_conflict"
    assert decision.order is None
    assert decision.events == ()
    assert decision.audit[0].reason == "order_conflict"


# --- decide_retry ----------------------------------------------------------------


def test_retry_of_a_failed_order_opens_the_next_attempt() -> None:
    decision = decide_retry(make_order(status="failed"), "pi_2", "wallet", "PAYMENT_FAILED")
    assert decision.outcome == "retry_accepted"
    assert decision.order == make_order(
        attempt=2,
        payment_intent_id="pi_2",
        payment_method="wallet",
        status="pending",
        earlier_intents=("pi_1",),
    )
    assert emitted(decision) == [
        (
            "PaymentRetryAccepted",
            {
                "order_id": "ord_1",
                "attempt": 2,
                "customer_id": "cus_1",
                "amount": 10345,
                "currency": "EUR",
                "payment_intent_id": "pi_2",
                "conference_id": None,
                "payment_method": "wallet",
            },
        ),
    ]
    assert decision.audit[0].action == "payment_retry"
    assert decision.audit[0].outcome == "retry_accepted"


def test_retries_count_attempts() -> None:
    order = make_order(status="failed")
    for attempt in (2, 3, 4):
        order = decide_retry(order, f"pi_{attempt}", "card", "PAYMENT_FAILED").order or order
        assert order.attempt == attempt
        assert order.earlier_intents == tuple(f"pi_{a}" for a in range(1, attempt))
        order = replace(order, status="failed")


def test_retry_of_an_unknown_order_is_rejected() -> None:
    decision = decide_retry(None, "pi_2", "card", None)
    assert (decision.outcome, decision.reason, decision.order, decision.events) == (
        "rejected",
        "unknown_order",
        None,
        (),
    )
    assert decision.audit[0].order_id is None


@pytest.mark.parametrize(
    ("status", "saga_status"),
    [
        ("pending", "PENDING_PAYMENT"),
        ("flagged", "NEEDS_RECONCILIATION"),
        ("accepted", "PAID_CONFIRMED"),
        ("accepted", "REFUNDED"),
        ("accepted", "NEEDS_RECONCILIATION"),
        # a failed attempt whose void then failed: orders would ignore the retry and
        # every event of the new attempt
        ("failed", "NEEDS_RECONCILIATION"),
    ],
)
def test_retry_is_only_allowed_after_a_failure(status: Any, saga_status: str) -> None:
    decision = decide_retry(make_order(status=status), "pi_2", "card", saga_status)
    assert (decision.outcome, decision.reason, decision.order, decision.events) == (
        "rejected",
        "retry_not_allowed_in_status",
        None,
        (),
    )


@pytest.mark.parametrize(
    ("status", "saga_status"),
    [
        ("accepted", "PAYMENT_AUTHORIZED"),  # a capture that may yet be declined
        ("accepted", "INVENTORY_RESERVED"),
        ("failed", None),  # declined here, PAYMENT_FAILED not yet published
        ("failed", "PENDING_PAYMENT"),
    ],
)
def test_retry_is_held_while_the_attempt_may_still_fail(status: Any, saga_status: str) -> None:
    decision = decide_retry(make_order(status=status), "pi_2", "card", saga_status)
    assert (decision.outcome, decision.reason, decision.order, decision.events) == (
        "held",
        "attempt_in_flight",
        None,
        (),
    )
    assert decision.audit[0].outcome == "held"


@pytest.mark.parametrize("intent", ["pi_1", "pi_0"])
def test_retry_with_the_intent_of_any_earlier_attempt_is_rejected(intent: str) -> None:
    order = make_order(status="failed", earlier_intents=("pi_0",))
    decision = decide_retry(order, intent, "card", "PAYMENT_FAILED")
    assert (decision.outcome, decision.reason, decision.order) == (
        "rejected",
        "payment_intent_reused",
        None,
    )


# --- decide_confirmation ---------------------------------------------------------


def test_authorization_accepts_the_order_with_the_authorization_flow() -> None:
    decision = decide_confirmation(make_order(), make_confirmation())
    assert decision.outcome == "accepted"
    assert decision.reason is None
    assert decision.order == make_order(status="accepted")
    [(event_type, payload)] = emitted(decision)
    assert event_type == "PaymentAccepted"
    assert payload == {
        "order_id": "ord_1",
        "attempt": 1,
        "payment_intent_id": "pi_1",
        "transaction_id": "txn_1",
        "flow": "authorization",
        "amount": 10345,
        "currency": "EUR",
        "gateway": "simgw",
        "customer_id": "cus_1",
        "items": [{"sku": "TICKET-A", "quantity": 2}, {"sku": "TSHIRT-M", "quantity": 1}],
        "payment_method_type": "card",
        "brand": "visa",
        "last4": "4242",
    }
    assert set(payload) >= CONTEXT_KEYS
    assert audited(decision) == [
        {
            "subject": "gateway_confirmation",
            "action": "confirmation",
            "outcome": "accepted",
            "reason": None,
            "order_id": "ord_1",
            "transaction_id": "txn_1",
            "gateway_event_id": "evt_1",
            "details": {},
        },
    ]


def test_captured_sale_is_accepted_with_the_sale_flow() -> None:
    confirmation = make_confirmation(
        type="payment.captured", payment_method_type="wallet", brand=None, last4=None
    )
    decision = decide_confirmation(make_order(attempt=2), confirmation)
    assert decision.outcome == "accepted"
    [(event_type, payload)] = emitted(decision)
    assert event_type == "PaymentAccepted"
    assert (payload["flow"], payload["attempt"], payload["payment_method_type"]) == (
        "sale",
        2,
        "wallet",
    )
    assert (payload["brand"], payload["last4"]) == (None, None)


def test_failed_payment_declines_the_order() -> None:
    confirmation = make_confirmation(
        type="payment.failed",
        transaction_id="txn_9",
        failure_code="card_declined",
        failure_message="The card was declined.",
    )
    decision = decide_confirmation(make_order(), confirmation)
    assert decision.outcome == "declined"
    assert decision.reason == "card_declined"
    assert decision.order == make_order(status="failed")
    assert emitted(decision) == [
        (
            "PaymentDeclined",
            {
                "order_id": "ord_1",
                "attempt": 1,
                "customer_id": "cus_1",
                "payment_intent_id": "pi_1",
                "transaction_id": "txn_9",
                "amount": 10345,
                "currency": "EUR",
                "failure_code": "card_declined",
                "failure_message": "The card was declined.",
            },
        ),
    ]
    assert decision.audit[0].outcome == "declined"
    assert decision.audit[0].reason == "card_declined"


@pytest.mark.parametrize(
    ("failure_code", "reason"),
    [
        ("Do-Not-Honor", "do_not_honor"),
        ("insufficient funds", "insufficient_funds"),
        ("05", "payment_declined"),
        ("", "payment_declined"),
        (None, None),
    ],
)
def test_gateway_failure_codes_become_snake_case_reasons(
    failure_code: str | None, reason: str | None
) -> None:
    confirmation = make_confirmation(type="payment.failed", failure_code=failure_code)
    decision = decide_confirmation(make_order(), confirmation)
    assert decision.reason == reason
    assert decision.audit[0].reason == reason
    # The event keeps the gateway's own code.
    assert emitted(decision)[0][1]["failure_code"] == failure_code


def test_confirmation_without_an_order_is_parked() -> None:
    decision = decide_confirmation(None, make_confirmation(order_id=None))
    assert (decision.outcome, decision.reason, decision.order, decision.events) == (
        "parked",
        None,
        None,
        (),
    )
    assert decision.audit[0].outcome == "parked"
    assert decision.audit[0].gateway_event_id == "evt_1"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"payment_intent_id": "pi_0"}, "payment_intent_mismatch"),
        ({"amount": 10344}, "amount_mismatch"),
        ({"currency": "USD"}, "currency_mismatch"),
        # checked in this order: the first failing rule is the reason
        (
            {"payment_intent_id": "pi_0", "amount": 1, "currency": "USD"},
            "payment_intent_mismatch",
        ),
        ({"amount": 1, "currency": "USD"}, "amount_mismatch"),
    ],
)
@pytest.mark.parametrize("kind", ["payment.authorized", "payment.captured", "payment.failed"])
def test_mismatched_confirmations_are_rejected_and_change_nothing(
    changes: dict[str, Any], reason: str, kind: Any
) -> None:
    order = make_order(earlier_intents=("pi_0",))
    decision = decide_confirmation(order, make_confirmation(type=kind, **changes))
    assert (decision.outcome, decision.reason, decision.order, decision.events) == (
        "rejected",
        reason,
        None,
        (),
    )
    assert set(audited(decision)[0]) == AUDIT_KEYS
    assert decision.audit[0].reason == reason


def test_confirmation_for_a_previous_attempt_is_an_intent_mismatch() -> None:
    order = make_order(attempt=2, payment_intent_id="pi_2", earlier_intents=("pi_1",))
    decision = decide_confirmation(order, make_confirmation(payment_intent_id="pi_1"))
    assert (decision.outcome, decision.reason, decision.order) == (
        "rejected",
        "payment_intent_mismatch",
        None,
    )


@pytest.mark.parametrize("status", ["failed", "pending"])
def test_confirmation_for_an_intent_the_order_has_not_seen_is_parked(status: Any) -> None:
    """The payment of a retry whose PaymentRetryRequested is still held or lagging: never
    lost — kept with the unmatched payments until the retry opens its attempt."""
    order = make_order(status=status)
    decision = decide_confirmation(order, make_confirmation(payment_intent_id="pi_2"))
    assert (decision.outcome, decision.order, decision.events) == ("parked", None, ())
    assert decision.audit[0].outcome == "parked"
    assert decision.audit[0].order_id == "ord_1"


def test_parked_payment_of_a_retry_settles_the_retried_attempt() -> None:
    payment = make_confirmation(payment_intent_id="pi_2", record_time=NOW - timedelta(minutes=1))
    assert decide_confirmation(make_order(status="failed"), payment).outcome == "parked"
    retried = decide_retry(make_order(status="failed"), "pi_2", "wallet", "PAYMENT_FAILED").order
    assert retried is not None
    [(_, decision)] = decide_match_unmatched(retried, [payment], NOW, WINDOW)
    assert decision.outcome == "accepted"
    assert emitted(decision)[0][1]["attempt"] == 2
    assert emitted(decision)[0][1]["transaction_id"] == "txn_1"


@pytest.mark.parametrize(
    ("kind", "outcome", "event"),
    [
        ("payment.authorized", "accepted", "PaymentAccepted"),
        ("payment.captured", "accepted", "PaymentAccepted"),
        ("payment.failed", "declined", "PaymentDeclined"),
    ],
)
def test_flagged_order_without_a_stored_confirmation_is_settled_by_it(
    kind: Any, outcome: str, event: str
) -> None:
    """The order was flagged because this very confirmation was dead-lettered (its
    database stayed down): replayed, it settles the attempt as if the order were pending."""
    decision = decide_confirmation(
        make_order(status="flagged"), make_confirmation(type=kind), attempt_confirmed=False
    )
    assert decision.outcome == outcome
    assert decision.order == make_order(status="accepted" if outcome == "accepted" else "failed")
    assert [event_type for event_type, _ in emitted(decision)] == [event]


def test_flagged_order_still_checks_intent_and_amount() -> None:
    order = make_order(status="flagged", earlier_intents=("pi_0",))
    for changes, reason in [
        ({"payment_intent_id": "pi_0"}, "payment_intent_mismatch"),
        ({"amount": 1}, "amount_mismatch"),
    ]:
        c = make_confirmation(**changes)
        decision = decide_confirmation(order, c, attempt_confirmed=False)
        assert (decision.outcome, decision.reason) == ("rejected", reason)


@pytest.mark.parametrize("status", ["accepted", "failed", "flagged"])
@pytest.mark.parametrize("kind", ["payment.authorized", "payment.captured", "payment.failed"])
def test_settled_attempt_rejects_further_confirmations(status: Any, kind: Any) -> None:
    decision = decide_confirmation(make_order(status=status), make_confirmation(type=kind))
    assert (decision.outcome, decision.reason, decision.order, decision.events) == (
        "rejected",
        "order_not_awaiting_payment",
        None,
        (),
    )


def test_second_confirmation_of_an_attempt_cannot_accept_twice() -> None:
    first = decide_confirmation(make_order(), make_confirmation())
    assert first.order is not None
    second = decide_confirmation(
        first.order, make_confirmation(gateway_event_id="evt_2", type="payment.captured")
    )
    assert second.reason == "order_not_awaiting_payment"
    assert second.events == ()


# --- decide_match_unmatched -----------------------------------------------------


def test_parked_confirmation_is_applied_when_its_order_arrives() -> None:
    parked = make_confirmation(order_id=None, record_time=NOW - timedelta(hours=1))
    [(confirmation, decision)] = decide_match_unmatched(make_order(), [parked], NOW, WINDOW)
    assert confirmation is parked
    assert decision.outcome == "accepted"
    assert decision.order == make_order(status="accepted")
    assert emitted(decision)[0][0] == "PaymentAccepted"
    assert decision.audit[0].action == "unmatched_matched"


def test_oldest_acceptable_confirmation_wins_and_the_rest_are_rejected() -> None:
    newer = make_confirmation(
        gateway_event_id="evt_new", type="payment.failed", record_time=NOW - timedelta(hours=1)
    )
    older = make_confirmation(gateway_event_id="evt_old", record_time=NOW - timedelta(hours=2))
    results = decide_match_unmatched(make_order(), [newer, older], NOW, WINDOW)
    assert [(c.gateway_event_id, d.outcome, d.reason) for c, d in results] == [
        ("evt_old", "accepted", None),
        ("evt_new", "rejected", "order_not_awaiting_payment"),
    ]
    assert results[1][1].order is None
    assert results[1][1].events == ()


def test_an_unacceptable_oldest_confirmation_does_not_block_the_next() -> None:
    wrong_amount = make_confirmation(
        gateway_event_id="evt_a", amount=1, record_time=NOW - timedelta(hours=3)
    )
    good = make_confirmation(gateway_event_id="evt_b", record_time=NOW - timedelta(hours=2))
    results = decide_match_unmatched(make_order(), [good, wrong_amount], NOW, WINDOW)
    assert [(c.gateway_event_id, d.outcome, d.reason) for c, d in results] == [
        ("evt_a", "rejected", "amount_mismatch"),
        ("evt_b", "accepted", None),
    ]


def test_only_confirmations_within_the_window_and_for_the_order_are_considered() -> None:
    at_edge = make_confirmation(gateway_event_id="evt_edge", record_time=NOW - WINDOW)
    too_old = make_confirmation(
        gateway_event_id="evt_old", record_time=NOW - WINDOW - timedelta(seconds=1)
    )
    other_intent = make_confirmation(gateway_event_id="evt_pi", payment_intent_id="pi_9")
    other_order = make_confirmation(gateway_event_id="evt_ord", order_id="ord_9")
    results = decide_match_unmatched(
        make_order(), [too_old, other_intent, other_order, at_edge], NOW, WINDOW
    )
    assert [c.gateway_event_id for c, _ in results] == ["evt_edge"]
    assert results[0][1].outcome == "accepted"


def test_nothing_parked_matches_nothing() -> None:
    assert decide_match_unmatched(make_order(), [], NOW, WINDOW) == []


def test_parked_decline_fails_the_order() -> None:
    parked = make_confirmation(type="payment.failed", failure_code="expired_card")
    [(_, decision)] = decide_match_unmatched(make_order(), [parked], NOW, WINDOW)
    assert (decision.outcome, decision.reason) == ("declined", "expired_card")
    assert decision.order == make_order(status="failed")


def test_audit_entries_never_carry_card_details() -> None:
    decisions = [
        decide_confirmation(make_order(), make_confirmation()),
        decide_confirmation(make_order(), make_confirmation(amount=1)),
        decide_confirmation(None, make_confirmation()),
        decide_order_placed(None, make_order()),
        decide_retry(make_order(status="failed"), "pi_2", "card", "PAYMENT_FAILED"),
    ]
    for decision in decisions:
        for entry in audited(decision):
            assert set(entry) == AUDIT_KEYS
            assert entry["details"] == {}
            assert "4242" not in json.dumps(entry)


def test_audit_entries_name_the_subject_of_their_action() -> None:
    parked = make_confirmation(order_id=None, record_time=NOW - timedelta(hours=1))
    [(_, matched)] = decide_match_unmatched(make_order(), [parked], NOW, WINDOW)
    decisions = {
        "order": decide_order_placed(None, make_order()),
        "payment_retry": decide_retry(
            make_order(status="failed"), "pi_2", "card", "PAYMENT_FAILED"
        ),
        "gateway_confirmation": decide_confirmation(make_order(), make_confirmation()),
        "unmatched_payment": matched,
    }
    assert {subject: [a.subject for a in d.audit] for subject, d in decisions.items()} == {
        subject: [subject] for subject in decisions
    }
