"""Unit tests of services/capture/domain.py and the capture worker's event mapping."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import events
from schemas.events import PaymentContext
from services.capture import domain
from services.capture.worker import CaptureWorker
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.intents.store import Claimed
from services.runtime.outbox import Cause

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
POLICY = domain.CapturePolicy(
    hold=timedelta(days=6), retry=domain.RetryPolicy(max_attempts=3, base_s=1, max_s=60)
)


def claim(
    prior_state: Any = "pending", attempt: int = 1, age: timedelta = timedelta(0)
) -> domain.Claim:
    return domain.Claim("txn_1", 1250, "EUR", prior_state, attempt, NOW - age)


def test_a_sale_is_confirmed_without_a_gateway_call() -> None:
    intent = domain.decide_stock_reserved("sale", "txn_1", None, NOW)
    assert intent.state == "sale_confirmed"
    assert intent.next_attempt_at is None


def test_an_authorization_becomes_a_pending_intent_due_now() -> None:
    occurred = NOW - timedelta(minutes=1)
    intent = domain.decide_stock_reserved("authorization", "txn_1", occurred, NOW)
    assert intent == domain.NewCapture("pending", "capture:txn_1", occurred, NOW)


def test_authorized_at_is_never_in_the_future() -> None:
    later = NOW + timedelta(hours=1)
    assert domain.decide_stock_reserved("authorization", "t", later, NOW).authorized_at == NOW


def test_a_pending_intent_is_captured_within_the_hold_and_expired_after() -> None:
    assert domain.first_step(claim(), NOW, POLICY) == domain.Call()
    old = claim(age=timedelta(days=6))
    assert domain.first_step(old, NOW, POLICY) == domain.Expired()


@pytest.mark.parametrize("prior", ["unknown", "in_flight"])
def test_a_call_that_may_have_reached_the_gateway_is_looked_up_first(prior: str) -> None:
    assert domain.first_step(claim(prior, age=timedelta(days=9)), NOW, POLICY) == domain.Lookup()


CAP_1 = {"capture_id": "cap_1", "amount": 1250, "currency": "EUR"}


@pytest.mark.parametrize(
    ("payment", "age", "expected"),
    [
        ({"state": "captured", "captures": [CAP_1]}, 0, domain.Captured("cap_1")),
        ({"state": "captured", "captures": [CAP_1]}, 9, domain.Captured("cap_1")),
        ({"state": "authorized", "captures": []}, 0, domain.Call()),
        ({"state": "voided", "captures": []}, 0, domain.CaptureDeclined("authorization_voided")),
        ({"state": "captured", "captures": []}, 0, domain.Failed("unexpected_payment_state")),
        ({"state": "failed"}, 0, domain.Failed("unexpected_payment_state")),
    ],
)
def test_after_lookup(payment: dict[str, Any], age: int, expected: object) -> None:
    assert domain.after_lookup(claim("unknown", age=timedelta(days=age)), payment) == expected


def test_after_capture_maps_every_outcome() -> None:
    c = claim()
    ok = GatewayOutcome("succeeded", {"capture_id": "cap_9", "status": "captured"})
    assert domain.after_capture(c, ok, NOW, POLICY, 0.0) == domain.Captured("cap_9")
    declined = GatewayOutcome("declined", {}, code="capture_declined")
    assert domain.after_capture(c, declined, NOW, POLICY, 0.0) == domain.CaptureDeclined(
        "capture_declined"
    )


def test_an_unknown_outcome_is_retried_within_the_budget() -> None:
    unknown = GatewayOutcome("unknown", reason="timeout")
    retry = domain.after_capture(claim(attempt=1), unknown, NOW, POLICY, 0.0)
    assert retry == domain.Retry(NOW + timedelta(seconds=0.5), "timeout")


def test_a_success_without_capture_id_is_resolved_by_a_lookup() -> None:
    nameless = GatewayOutcome("succeeded", {"status": "captured"})
    assert isinstance(domain.after_capture(claim(), nameless, NOW, POLICY, 0.0), domain.Retry)


@given(st.integers(1, 50), st.floats(0, 1, exclude_max=True))
def test_backoff_grows_and_is_capped(attempt: int, jitter: float) -> None:
    policy = domain.RetryPolicy(10, base_s=1, max_s=60)
    ceiling = min(60.0, 2.0 ** (attempt - 1))
    assert ceiling / 2 <= policy.delay_s(attempt, jitter) <= ceiling


def _claimed() -> Claimed[domain.Claim]:
    context = PaymentContext(
        order_id="ord_1", attempt=1, payment_intent_id="pi_1", transaction_id="txn_1",
        flow="authorization", amount=1250, currency="EUR", gateway="simgw",
    )  # fmt: skip
    return Claimed(claim(), "capture:txn_1", context, Cause("evt_1", 3, "corr"), "tok")


@pytest.mark.parametrize(
    ("resolution", "event_type"),
    [
        (domain.Captured("cap_1"), events.PaymentCaptured),
        (domain.CaptureDeclined("capture_declined"), events.CaptureDeclined),
        (domain.Expired(), events.AuthorizationExpired),
        (domain.Failed("retry_budget_exhausted"), events.CaptureFailed),
    ],
)
def test_each_final_resolution_emits_its_event(
    resolution: domain.Resolution, event_type: type[events.PaymentContext]
) -> None:
    event = CaptureWorker.event_for(_claimed(), resolution)
    assert isinstance(event, event_type)
    assert event.transaction_id == "txn_1"


def test_a_retry_emits_nothing() -> None:
    assert CaptureWorker.event_for(_claimed(), domain.Retry(NOW, "timeout")) is None


def test_the_emitted_envelope_follows_its_cause() -> None:
    assert Cause("evt_1", 3, "corr").next_seq == 4
    assert Cause("evt_1", None, None).next_seq == 1


# --- F1: a spent retry budget raises the alarm once, and look-ups go on ---------------


def test_a_spent_budget_raises_the_alarm_but_keeps_the_row_alive() -> None:
    unknown = GatewayOutcome("unknown", reason="timeout")
    last = domain.after_capture(claim("unknown", attempt=3), unknown, NOW, POLICY, 0.0)
    assert isinstance(last, domain.Stalled)
    assert (last.alerted_at, last.error) == (NOW, "timeout")
    assert NOW < last.next_attempt_at <= NOW + timedelta(seconds=POLICY.retry.stalled_max_s)


def test_after_the_alarm_look_ups_go_on_without_a_second_alarm() -> None:
    alerted = dataclasses.replace(claim("unknown", attempt=7), alerted=True)
    later = domain.retry_later(alerted, "lookup: 503", NOW, POLICY, 0.99)
    assert isinstance(later, domain.Retry)
    assert later.next_attempt_at <= NOW + timedelta(seconds=POLICY.retry.stalled_max_s)


@given(st.integers(1, 200), st.floats(0, 1, exclude_max=True), st.booleans())
def test_the_stalled_backoff_is_capped(attempt: int, jitter: float, alerted: bool) -> None:
    policy = dataclasses.replace(POLICY, retry=dataclasses.replace(POLICY.retry, stalled_max_s=900))
    c = dataclasses.replace(claim("unknown", attempt=attempt), alerted=alerted)
    later = domain.retry_later(c, "x", NOW, policy, jitter)
    assert not isinstance(later, domain.Failed)
    assert NOW < later.next_attempt_at <= NOW + timedelta(seconds=900)


@pytest.mark.parametrize("alerted", [False, True])
def test_a_lookup_after_the_alarm_settles_the_row(alerted: bool) -> None:
    c = dataclasses.replace(claim("unknown", attempt=12), alerted=alerted)
    captured = {"state": "captured", "captures": [CAP_1]}
    assert domain.after_lookup(c, captured) == domain.Captured("cap_1")
    voided = {"state": "voided", "captures": []}
    assert domain.after_lookup(c, voided) == domain.CaptureDeclined("authorization_voided")


def test_a_transaction_the_gateway_does_not_know_releases_the_stock() -> None:
    missing = GatewayOutcome("not_found")
    assert domain.after_capture(claim(), missing, NOW, POLICY, 0.0) == domain.CaptureDeclined(
        "transaction_not_found"
    )
    assert domain.not_found() == domain.CaptureDeclined("transaction_not_found")


def test_capture_failed_is_emitted_once_per_transaction() -> None:
    stalled = domain.Stalled(NOW, NOW + timedelta(minutes=15), "timeout")
    alarm = CaptureWorker.event_for(_claimed(), stalled)
    assert isinstance(alarm, events.CaptureFailed)
    assert alarm.reason == "retry_budget_exhausted"
    base = _claimed()
    alerted = dataclasses.replace(base, claim=dataclasses.replace(base.claim, alerted=True))
    assert CaptureWorker.event_for(alerted, domain.Failed("amount_mismatch")) is None
    assert CaptureWorker.event_for(alerted, domain.Retry(NOW, "timeout")) is None
    assert isinstance(
        CaptureWorker.event_for(alerted, domain.Captured("c")), events.PaymentCaptured
    )


# --- F4: a capture that may have been sent is never expired on a look-up -------------


@pytest.mark.parametrize("prior", ["unknown", "in_flight"])
def test_an_authorized_lookup_past_the_hold_resends_the_capture(prior: str) -> None:
    c = claim(prior, attempt=2, age=timedelta(days=9))
    authorized = {"state": "authorized", "captures": []}
    assert domain.after_lookup(c, authorized) == domain.Call()


def test_only_a_capture_never_sent_expires() -> None:
    assert domain.first_step(claim("pending", age=timedelta(days=9)), NOW, POLICY) == (
        domain.Expired()
    )


# --- F5: a look-up's capture counts only for the claim's amount and currency ---------


@pytest.mark.parametrize(
    "captures",
    [
        [{"capture_id": "cap_1", "amount": 500, "currency": "EUR"}],
        [{"capture_id": "cap_1", "amount": 1250, "currency": "USD"}],
        [{"capture_id": "cap_1"}],
        [{"capture_id": "cap_0", "amount": 250, "currency": "EUR"}, CAP_1],
    ],
)
def test_a_capture_of_another_amount_goes_to_reconciliation(captures: list[Any]) -> None:
    payment = {"state": "captured", "captures": captures}
    assert domain.after_lookup(claim("unknown"), payment) == domain.Failed("amount_mismatch")
    event = CaptureWorker.event_for(_claimed(), domain.Failed("amount_mismatch"))
    assert isinstance(event, events.CaptureFailed)
    assert event.reason == "amount_mismatch"
