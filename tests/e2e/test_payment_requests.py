"""Orders that arrive without a payment_intent_id: paysaga requests the payment from the
gateway (docs/contract.md §3.7), publishes PaymentRequested on payments.requests.v1, and the
customer pays on the gateway's page. One payment per attempt whatever fails; the client
secret appears on payments.requests.v1 only."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import httpx
import pytest

from services import devstack
from services.devclient import read_all, wait_for
from services.runtime import topics
from services.runtime.topics import partitions_of
from tests.e2e.conftest import Stack, new_id, paysaga
from tests.support.harness import REPO

pytestmark = pytest.mark.e2e

PROFILE = devstack.PROFILES["test"]
PAYMENTS = next(sp for sp in devstack.SERVICE_PROCESSES if sp.name == "payments")


def order_without_intent(stack: Stack, marker: str = "") -> tuple[str, int]:
    order_id = new_id("ord") + marker
    stack.set_stock(f"sku-{order_id}", 5)
    total = stack.place_order(order_id, intent=None, items=[(f"sku-{order_id}", 2, 1250)])
    return order_id, total


def requested(stack: Stack, order_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The order's PaymentRequested payloads, once there are ``count`` of them."""
    return wait_for(
        lambda: len(r := stack.payment_requests(order_id)) >= count and r,
        what=f"{count} PaymentRequested for {order_id}",
    )


def gateway_intents(stack: Stack, order_id: str) -> list[dict[str, Any]]:
    ledger = httpx.get(f"{stack.url('gatewaysim')}/sim/ledger", timeout=10).json()
    return [i for i in ledger["payment_intents"] if i["order_id"] == order_id]


def statuses(stack: Stack, order_id: str) -> list[str]:
    order = stack.order(order_id)
    return [h["status"] for h in order["history"]] if order else []


def test_an_order_without_an_intent_is_requested_then_paid(stack: Stack) -> None:
    order_id, total = order_without_intent(stack)
    [request] = requested(stack, order_id)
    intent = request["payment_intent_id"]
    assert request["amount"] == total
    assert (request["currency"], request["payment_method"]) == ("EUR", "card")
    assert request["client_secret"]
    assert request["expires_at"]
    # the status API shows the intent once the gateway named it
    waiting = wait_for(
        lambda: (o := stack.order(order_id)) and o["payment_intent_id"] == intent and o,
        what="the status API shows the requested intent",
    )
    assert waiting["status"] == "PENDING_PAYMENT"
    txn = stack.confirm(intent, "authorize")["transaction_id"]
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert (done["payment_intent_id"], done["transaction_id"]) == (intent, txn)
    assert statuses(stack, order_id) == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert len(stack.ledger(txn)["captures"]) == 1
    [created] = gateway_intents(stack, order_id)
    assert (created["id"], created["amount"]) == (intent, total)
    assert stack.payment_requests(order_id) == [request]


def test_a_retry_without_an_intent_requests_a_new_payment(stack: Stack) -> None:
    order_id, _ = order_without_intent(stack)
    [first] = requested(stack, order_id)
    stack.confirm(first["payment_intent_id"], "decline")
    assert stack.wait_status(order_id, "PAYMENT_FAILED")["reason"] == "card_declined"
    stack.retry(order_id, None, "wallet")
    second = requested(stack, order_id, 2)[1]
    assert second["payment_intent_id"] != first["payment_intent_id"]
    assert second["payment_method"] == "wallet"
    txn = stack.confirm(second["payment_intent_id"], "sale")["transaction_id"]
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert (done["payment_intent_id"], done["transaction_id"]) == (
        second["payment_intent_id"],
        txn,
    )
    keys = stack.db(
        "payments",
        "SELECT attempt, idempotency_key, state FROM payment_requests WHERE order_id=%s"
        " ORDER BY attempt",
        order_id,
    )
    assert keys == [
        (1, f"intent:{order_id}:1", "requested"),
        (2, f"intent:{order_id}:2", "requested"),
    ]
    assert len(gateway_intents(stack, order_id)) == 2


def test_a_lost_answer_creates_one_payment(stack: Stack) -> None:
    """The gateway creates the payment but its answer never arrives (timeout): the next
    round replays the same key and gets the same payment."""
    order_id, _ = order_without_intent(stack, "_request_lost")
    [request] = requested(stack, order_id)
    [created] = gateway_intents(stack, order_id)
    assert created["id"] == request["payment_intent_id"]
    stack.confirm(request["payment_intent_id"], "sale")
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert len(stack.payment_requests(order_id)) == 1


def test_the_requesting_process_killed_after_the_call_creates_one_payment(
    stack: Stack,
) -> None:
    """payments dies right after the gateway answered, before the outcome is stored: the
    request is reclaimed after its lease and replayed under the same key."""
    pidfile = PROFILE.root / "pids" / f"{PAYMENTS.name}.pid"
    assert devstack.stop_pid(pidfile, f"-m {PAYMENTS.module}")
    env = {
        **stack.env,
        "PAYSAGA_FAULT_POINT": "payment_request_after_gateway_call",
        "PAYSAGA_PAYMENTS_REQUEST_LEASE_S": "3",
    }
    log = PROFILE.root / "logs" / f"{PAYMENTS.name}.log"
    pid = devstack.spawn([sys.executable, "-m", PAYMENTS.module], log, pidfile, env)
    try:
        order_id, _ = order_without_intent(stack)
        wait_for(lambda: not devstack.pid_running(pid), what="payments killed at the fault point")
        assert len(gateway_intents(stack, order_id)) == 1
        assert stack.payment_requests(order_id) == []
    finally:
        devstack.services_up(PROFILE, stack.env)
    [request] = requested(stack, order_id)
    [created] = gateway_intents(stack, order_id)
    assert created["id"] == request["payment_intent_id"]
    stack.confirm(request["payment_intent_id"], "authorize")
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert len(stack.payment_requests(order_id)) == 1


def test_a_confirmation_ahead_of_the_recorded_intent_is_matched_when_it_is_recorded(
    stack: Stack,
) -> None:
    """The gateway created the payment, payments died before storing it, and the customer
    pays that payment before payments records its intent: the confirmation is parked (no
    order has that intent yet) and matched once the replayed request records it."""
    pidfile = PROFILE.root / "pids" / f"{PAYMENTS.name}.pid"
    assert devstack.stop_pid(pidfile, f"-m {PAYMENTS.module}")
    env = {
        **stack.env,
        "PAYSAGA_FAULT_POINT": "payment_request_after_gateway_call",
        "PAYSAGA_PAYMENTS_REQUEST_LEASE_S": "20",  # reclaimed well after the restart
    }
    log = PROFILE.root / "logs" / f"{PAYMENTS.name}.log"
    pid = devstack.spawn([sys.executable, "-m", PAYMENTS.module], log, pidfile, env)
    try:
        order_id, _ = order_without_intent(stack)
        wait_for(lambda: not devstack.pid_running(pid), what="payments killed at the fault point")
        [created] = gateway_intents(stack, order_id)
        txn = stack.confirm(created["id"], "sale")["transaction_id"]
    finally:
        devstack.services_up(PROFILE, stack.env)
    parked = "SELECT state FROM unmatched_payments WHERE transaction_id=%s"
    wait_for(lambda: stack.db("payments", parked, txn) == [("parked",)], what="parked")
    assert stack.db(
        "payments", "SELECT state FROM payment_requests WHERE order_id=%s", order_id
    ) == [("in_flight",)], "the request was settled before the confirmation was parked"
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert (done["payment_intent_id"], done["transaction_id"]) == (created["id"], txn)
    assert stack.db("payments", parked, txn) == [("matched",)]
    assert [r["payment_intent_id"] for r in requested(stack, order_id)] == [created["id"]]
    assert len(gateway_intents(stack, order_id)) == 1


def test_a_refused_request_fails_the_attempt_with_the_gateways_code(stack: Stack) -> None:
    order_id, _ = order_without_intent(stack, "_request_declined")
    failed = stack.wait_status(order_id, "PAYMENT_FAILED")
    assert (failed["reason"], failed["payment_intent_id"]) == ("request_declined", None)
    assert stack.payment_requests(order_id) == []
    kinds = wait_for(lambda: stack.notifications(order_id), what="a notification")
    assert [n["kind"] for n in kinds] == ["payment_failed"]


def test_a_flaky_gateway_is_retried(stack: Stack) -> None:
    order_id, _ = order_without_intent(stack, "_request_flaky")
    [request] = requested(stack, order_id)
    assert [i["id"] for i in gateway_intents(stack, order_id)] == [request["payment_intent_id"]]


def test_a_gateway_down_past_the_budget_needs_reconciliation(stack: Stack) -> None:
    order_id, _ = order_without_intent(stack, "_request_down")
    flagged = stack.wait_status(order_id, "NEEDS_RECONCILIATION")
    assert flagged["reason"] == "payment_request_failed"
    assert stack.db(
        "payments", "SELECT state, attempts FROM payment_requests WHERE order_id=%s", order_id
    ) == [("failed", 3)]
    assert gateway_intents(stack, order_id) == []


def test_the_client_secret_is_found_nowhere_but_on_its_topic(stack: Stack) -> None:
    order_id, _ = order_without_intent(stack)
    [request] = requested(stack, order_id)
    secret = request["client_secret"]
    stack.confirm(request["payment_intent_id"], "authorize")
    stack.wait_status(order_id, "PAID_CONFIRMED")
    # the outbox row is deleted once the relay published it
    wait_for(
        lambda: (
            stack.db(
                "payments",
                "SELECT count(*) FROM outbox WHERE topic = 'payments.requests.v1'"
                " AND convert_from(value, 'UTF8') LIKE %s",
                f"%{secret}%",
            )
            == [(0,)]
        ),
        what="the PaymentRequested outbox row gone",
    )
    for service in ("payments", "orders", "inventory", "capture", "refunds"):
        dump = subprocess.run(
            [
                str(devstack.pg_bindir() / "pg_dump"),
                "--data-only",
                f"--port={PROFILE.pg_port}",
                "--host=127.0.0.1",
                "--username=paysaga",
                f"paysaga_{service}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert secret not in dump.stdout, f"client secret stored in paysaga_{service}"
    test_root = REPO / ".local" / "test"
    logs = [*(test_root / "logs").glob("*.log"), test_root / "pg" / "postgres.log"]
    for log in logs:
        if log.exists():
            assert secret not in log.read_text(errors="replace"), f"client secret in {log.name}"
    status = httpx.get(f"{stack.url('orders')}/orders/{order_id}", timeout=10).text
    assert secret not in status
    # every topic on the broker (the admin client's list: a new topic cannot be missed)
    others = {tp.topic for tp in asyncio.run(partitions_of(stack.bootstrap))}
    others.discard(topics.PAYMENT_REQUESTS_TOPIC)
    assert {s.name for s in topics.load_specs()} - others == {topics.PAYMENT_REQUESTS_TOPIC}
    for topic in sorted(others):
        for rec in asyncio.run(read_all(stack.bootstrap, topic)):
            parts = [rec.key or b"", rec.value or b"", *(v for _, v in rec.headers or ())]
            assert not any(secret.encode() in part for part in parts), f"client secret on {topic}"
    assert any(
        secret.encode() in rec.value
        for rec in asyncio.run(read_all(stack.bootstrap, topics.PAYMENT_REQUESTS_TOPIC))
    )


def test_reconcile_names_a_requested_payment_no_longer_waited_on(stack: Stack) -> None:
    """Attempt 1's requested payment is declined and the customer pays attempt 2: the
    first is abandoned (a notice: no money). If the customer later completes attempt 1's
    page anyway and the gateway captures it, that money is a violation."""
    order_id, _ = order_without_intent(stack)
    [first] = requested(stack, order_id)
    stack.confirm(first["payment_intent_id"], "decline")
    stack.wait_status(order_id, "PAYMENT_FAILED")
    stack.retry(order_id, None, "wallet")
    second = requested(stack, order_id, 2)[1]
    stack.confirm(second["payment_intent_id"], "authorize")
    stack.wait_status(order_id, "PAID_CONFIRMED")

    clean = paysaga(stack, "reconcile", "--gateway", "--order", order_id)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    notice = next(ln for ln in clean.stdout.splitlines() if "requested_payment_abandoned" in ln)
    assert order_id in notice
    assert first["payment_intent_id"] in notice
    assert second["payment_intent_id"] not in clean.stdout

    late = stack.confirm(first["payment_intent_id"], "sale")["transaction_id"]
    found = paysaga(stack, "reconcile", "--gateway", "--order", order_id)
    assert found.returncode == 1, found.stdout + found.stderr
    line = next(ln for ln in found.stdout.splitlines() if "requested_payment_captured" in ln)
    assert order_id in line
    assert late in line
