"""Unit tests of services/capture/domain.py and the capture worker's event mapping."""

from __future__ import annotations

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
from services.runtime.intents import Cause, Claimed

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
    assert domain.first_step(claim(), NOW, POLICY) == domain.CallCapture()
    old = claim(age=timedelta(days=6))
    assert domain.first_step(old, NOW, POLICY) == domain.Expired()


@pytest.mark.parametrize("prior", ["unknown", "in_flight"])
def test_a_call_that_may_have_reached_the_gateway_is_looked_up_first(prior: str) -> None:
    assert domain.first_step(claim(prior, age=timedelta(days=9)), NOW, POLICY) == domain.Lookup()


@pytest.mark.parametrize(
    ("payment", "age", "expected"),
    [
        ({"state": "captured", "captures": [{"capture_id": "cap_1"}]}, 0, domain.Captured("cap_1")),
        ({"state": "captured", "captures": [{"capture_id": "cap_1"}]}, 9, domain.Captured("cap_1")),
        ({"state": "authorized", "captures": []}, 0, domain.CallCapture()),
        ({"state": "authorized", "captures": []}, 9, domain.Expired()),
        ({"state": "voided", "captures": []}, 0, domain.Failed("authorization_voided")),
        ({"state": "captured", "captures": []}, 0, domain.Failed("unexpected_payment_state")),
        ({"state": "failed"}, 0, domain.Failed("unexpected_payment_state")),
    ],
)
def test_after_lookup(payment: dict[str, Any], age: int, expected: object) -> None:
    assert (
        domain.after_lookup(claim("unknown", age=timedelta(days=age)), payment, NOW, POLICY)
        == expected
    )


def test_after_capture_maps_every_outcome() -> None:
    c = claim()
    ok = GatewayOutcome("succeeded", {"capture_id": "cap_9", "status": "captured"})
    assert domain.after_capture(c, ok, NOW, POLICY, 0.0) == domain.Captured("cap_9")
    declined = GatewayOutcome("declined", {}, code="capture_declined")
    assert domain.after_capture(c, declined, NOW, POLICY, 0.0) == domain.CaptureDeclined(
        "capture_declined"
    )
    missing = GatewayOutcome("not_found")
    assert domain.after_capture(c, missing, NOW, POLICY, 0.0) == domain.Failed(
        "transaction_not_found"
    )


def test_an_unknown_outcome_is_retried_then_fails_to_reconciliation() -> None:
    unknown = GatewayOutcome("unknown", reason="timeout")
    retry = domain.after_capture(claim(attempt=1), unknown, NOW, POLICY, 0.0)
    assert retry == domain.Retry(NOW + timedelta(seconds=0.5), "timeout")
    last = domain.after_capture(claim(attempt=3), unknown, NOW, POLICY, 0.0)
    assert last == domain.Failed("retry_budget_exhausted")


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
