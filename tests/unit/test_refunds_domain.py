"""Unit tests of services/refunds/domain.py and the refunds worker's event mapping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import events
from schemas.events import PaymentContext
from services.refunds import domain
from services.refunds.worker import RefundsWorker
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.intents import Cause, Claimed

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


def test_an_unknown_outcome_is_retried_then_fails() -> None:
    unknown = GatewayOutcome("unknown", reason="timeout")
    assert domain.after_call(claim(attempt=1), unknown, NOW, POLICY, 0) == domain.Retry(
        NOW + timedelta(seconds=0.5), "timeout"
    )
    assert domain.after_call(claim(attempt=3), unknown, NOW, POLICY, 0) == domain.Failed(
        "retry_budget_exhausted"
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
