"""Pure parts of the payment request (docs/contract.md §3.7): how a round ends, and what the
projection does with the request's events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.orders.domain import decide
from services.payments import requests
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.retry import RetryPolicy

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, base_s=1.0, max_s=10.0)


def claim(round_: int = 1) -> requests.Claim:
    return requests.Claim("ord_1", 1, 2500, "EUR", "card", round_)


def test_a_created_payment_is_requested_and_its_secret_never_shown() -> None:
    body = {"id": "pi_1", "client_secret": "pi_1_secret_x", "expires_at": "2026-11-22T11:00:00Z"}
    done = requests.after_call(claim(), GatewayOutcome("succeeded", body), NOW, POLICY, 0.5)
    assert done == requests.Requested("pi_1", "pi_1_secret_x", "2026-11-22T11:00:00Z")
    assert "secret" not in repr(done)


def test_a_refusal_fails_the_attempt_with_the_gateways_code() -> None:
    outcome = GatewayOutcome("declined", code="request_declined", message="no")
    done = requests.after_call(claim(), outcome, NOW, POLICY, 0.5)
    assert done == requests.Refused("request_declined", "no")


def test_an_unknown_outcome_is_retried_then_fails_after_the_budget() -> None:
    lost = GatewayOutcome("unknown", reason="timeout")
    retry = requests.after_call(claim(1), lost, NOW, POLICY, 0.0)
    assert isinstance(retry, requests.Retry)
    assert retry.next_attempt_at > NOW
    assert requests.after_call(claim(3), lost, NOW, POLICY, 0.0) == requests.Failed(
        "retry_budget_exhausted"
    )


def test_one_key_per_attempt() -> None:
    assert requests.request_key("ord_1", 2) == "intent:ord_1:2"


def registered() -> Any:
    payload = {
        "order_id": "ord_1",
        "attempt": 1,
        "customer_id": "c",
        "amount": 2500,
        "currency": "EUR",
        "payment_intent_id": None,
    }
    return decide(None, "OrderRegistered", payload).view


def test_the_projection_learns_the_intent_without_a_status_change() -> None:
    view = registered()
    assert view.payment_intent_id is None
    out = decide(view, "PaymentIntentCreated", {"order_id": "ord_1", "attempt": 1,
                                                "payment_intent_id": "pi_1"})  # fmt: skip
    assert out.change is None
    assert out.view is not None
    assert (out.view.payment_intent_id, out.view.version) == ("pi_1", view.version)
    stale = decide(view, "PaymentIntentCreated", {"order_id": "ord_1", "attempt": 0,
                                                  "payment_intent_id": "pi_0"})  # fmt: skip
    assert stale.ignored_reason == "stale_attempt"


def test_a_refused_request_is_payment_failed_and_a_failed_one_needs_reconciliation() -> None:
    view = registered()
    base = {"order_id": "ord_1", "attempt": 1}
    refused = decide(
        view, "PaymentRequestRefused", {**base, "failure_code": "Do-Not-Honor",
                                        "failure_message": None}
    )  # fmt: skip
    assert refused.change is not None
    assert (refused.change.status, refused.change.reason) == ("PAYMENT_FAILED", "do_not_honor")
    assert refused.notification is not None
    failed = decide(view, "PaymentRequestFailed", {**base, "reason": "retry_budget_exhausted"})
    assert failed.change is not None
    assert (failed.change.status, failed.change.reason) == (
        "NEEDS_RECONCILIATION",
        "payment_request_failed",
    )
