"""Unit tests of services/refunds/domain.py and the refunds worker's event mapping."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import events
from schemas.events import PaymentContext
from services.refunds import domain
from services.refunds.worker import RefundsWorker
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.intents.store import Claimed
from services.runtime.outbox import Cause

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
POLICY = domain.RetryPolicy(max_attempts=3, base_s=1, max_s=60)


def claim(action: Any = "refund", prior: Any = "pending", attempt: int = 1) -> domain.Claim:
    return domain.Claim("txn_1", action, 1250, "EUR", "out_of_stock", prior, attempt)


@pytest.mark.parametrize(
    ("flow", "trigger", "expected"),
    [
        ("authorization", "out_of_stock", ("void", "void:txn_1")),
        ("sale", "out_of_stock", ("refund", "refund:txn_1")),
        ("authorization", "capture_declined", ("void", "void:txn_1")),
        ("authorization", "authorization_expired", ("void", "void:txn_1")),
        ("sale", "capture_declined", None),
        ("sale", "authorization_expired", None),
    ],
)
def test_which_compensation_a_trigger_asks_for(flow: Any, trigger: Any, expected: Any) -> None:
    intent = domain.decide_compensation(flow, trigger, "txn_1")
    assert (intent and (intent.action, intent.idempotency_key)) == expected
    if intent is not None:
        assert intent.reason == trigger


def test_only_a_never_sent_compensation_is_called_without_a_lookup() -> None:
    assert domain.first_step(claim()) == domain.Call()
    assert domain.first_step(claim(prior="unknown")) == domain.Lookup()
    assert domain.first_step(claim(prior="in_flight")) == domain.Lookup()


@pytest.mark.parametrize(
    ("action", "payment", "expected"),
    [
        (
            "refund",
            {
                "state": "refunded",
                "refunds": [{"refund_id": "re_1", "amount": 1250, "currency": "EUR"}],
            },
            domain.Succeeded("re_1"),
        ),
        ("refund", {"state": "captured", "refunds": []}, domain.Call()),
        ("refund", {"state": "voided", "refunds": []}, domain.Failed("unexpected_payment_state")),
        ("void", {"state": "voided", "voids": [{"void_id": "v"}]}, domain.Succeeded()),
        ("void", {"state": "authorized", "voids": []}, domain.Call()),
        ("void", {"state": "captured", "voids": []}, domain.Failed("unexpected_payment_state")),
    ],
)
def test_after_lookup(action: Any, payment: dict[str, Any], expected: object) -> None:
    assert domain.after_lookup(claim(action, "unknown"), payment) == expected


def test_after_call_maps_every_outcome() -> None:
    ok = GatewayOutcome("succeeded", {"refund_id": "re_2", "status": "succeeded"})
    assert domain.after_call(claim(), ok, NOW, POLICY, 0) == domain.Succeeded("re_2")
    voided = GatewayOutcome("succeeded", {"status": "voided"})
    assert domain.after_call(claim("void"), voided, NOW, POLICY, 0) == domain.Succeeded()
    declined = GatewayOutcome("declined", code="refund_declined")
    assert domain.after_call(claim(), declined, NOW, POLICY, 0) == domain.Failed("declined")
    gone = GatewayOutcome("not_found")
    assert domain.after_call(claim(), gone, NOW, POLICY, 0) == domain.Failed("not_found")


def test_an_unknown_outcome_is_retried_within_the_budget() -> None:
    unknown = GatewayOutcome("unknown", reason="timeout")
    assert domain.after_call(claim(attempt=1), unknown, NOW, POLICY, 0) == domain.Retry(
        NOW + timedelta(seconds=0.5), "timeout"
    )


def _claimed(action: Any) -> Claimed[domain.Claim]:
    context = PaymentContext(
        order_id="ord_1", attempt=1, payment_intent_id="pi_1", transaction_id="txn_1",
        flow="sale" if action == "refund" else "authorization", amount=1250, currency="EUR",
        gateway="simgw",
    )  # fmt: skip
    return Claimed(claim(action), f"{action}:txn_1", context, Cause("evt_1", 2, None), "tok")


def test_each_resolution_emits_its_event() -> None:
    refunded = RefundsWorker.event_for(_claimed("refund"), domain.Succeeded("re_1"))
    assert isinstance(refunded, events.RefundSucceeded)
    assert (refunded.refund_id, refunded.reason) == ("re_1", "out_of_stock")
    voided = RefundsWorker.event_for(_claimed("void"), domain.Succeeded())
    assert isinstance(voided, events.AuthorizationVoided)
    failed = RefundsWorker.event_for(_claimed("refund"), domain.Failed("declined"))
    assert isinstance(failed, events.CompensationFailed)
    assert (failed.action, failed.reason) == ("refund", "declined")
    assert RefundsWorker.event_for(_claimed("void"), domain.Retry(NOW, "timeout")) is None


# --- an unknown outcome is never final: a spent budget raises the alarm, look-ups go on


@pytest.mark.parametrize(
    ("action", "outcome", "error"),
    [
        ("void", GatewayOutcome("unknown", reason="timeout"), "timeout"),
        ("refund", GatewayOutcome("unknown", reason="timeout"), "timeout"),
        ("refund", GatewayOutcome("succeeded", {"status": "succeeded"}), "refund_id_missing"),
    ],
)
def test_an_unknown_outcome_of_the_last_round_stalls_instead_of_failing(
    action: Any, outcome: GatewayOutcome, error: str
) -> None:
    last = domain.after_call(claim(action, attempt=3), outcome, NOW, POLICY, 0.0)
    assert isinstance(last, domain.Stalled)
    assert (last.alerted_at, last.error) == (NOW, error)
    assert NOW < last.next_attempt_at <= NOW + timedelta(seconds=POLICY.stalled_max_s)


def test_after_the_alarm_look_ups_go_on_without_a_second_alarm() -> None:
    alerted = dataclasses.replace(claim(prior="unknown", attempt=7), alerted=True)
    later = domain.retry_later(alerted, "lookup: 503", NOW, POLICY, 0.99)
    assert isinstance(later, domain.Retry)
    assert later.next_attempt_at <= NOW + timedelta(seconds=POLICY.stalled_max_s)


@given(st.integers(1, 200), st.floats(0, 1, exclude_max=True), st.booleans())
def test_the_stalled_backoff_is_capped_and_never_fails(
    attempt: int, jitter: float, alerted: bool
) -> None:
    policy = domain.RetryPolicy(3, base_s=1, max_s=60, stalled_max_s=900.0)
    c = dataclasses.replace(claim(prior="unknown", attempt=attempt), alerted=alerted)
    later = domain.retry_later(c, "x", NOW, policy, jitter)
    assert isinstance(later, domain.Retry | domain.Stalled)
    assert isinstance(later, domain.Stalled) == (attempt >= 3 and not alerted)
    assert NOW < later.next_attempt_at <= NOW + timedelta(seconds=900)


@pytest.mark.parametrize("alerted", [False, True])
def test_a_lookup_after_the_alarm_settles_the_compensation(alerted: bool) -> None:
    refund = dataclasses.replace(claim("refund", "unknown", attempt=12), alerted=alerted)
    refunded = {
        "state": "refunded",
        "refunds": [{"refund_id": "re_1", "amount": 1250, "currency": "EUR"}],
    }
    assert domain.after_lookup(refund, refunded) == domain.Succeeded("re_1")
    void = dataclasses.replace(claim("void", "unknown", attempt=12), alerted=alerted)
    assert domain.after_lookup(void, {"state": "voided", "voids": [{}]}) == domain.Succeeded()


def test_compensation_failed_is_emitted_once_per_compensation() -> None:
    stalled = domain.Stalled(NOW, NOW + timedelta(minutes=15), "timeout")
    for action in ("void", "refund"):
        alarm = RefundsWorker.event_for(_claimed(action), stalled)
        assert isinstance(alarm, events.CompensationFailed)
        assert (alarm.action, alarm.reason) == (action, "retry_budget_exhausted")
    base = _claimed("refund")
    alerted = dataclasses.replace(base, claim=dataclasses.replace(base.claim, alerted=True))
    assert RefundsWorker.event_for(alerted, domain.Failed("amount_mismatch")) is None
    assert RefundsWorker.event_for(alerted, domain.Retry(NOW, "timeout")) is None
    assert isinstance(
        RefundsWorker.event_for(alerted, domain.Succeeded("re_1")), events.RefundSucceeded
    )
