"""A payment confirmation end to end (docs/contract.md §2.2): a gateway confirms a
payment; the order's status is recorded accurately, durably and retrievably — and every
failure branch changes nothing it must not. Driven through the contract only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest

from services import devstack
from services.devclient import produce, read_all, wait_for
from services.runtime.signature import sign
from tests.e2e.conftest import Stack, new_id, paysaga
from tests.support.harness import REPO

pytestmark = pytest.mark.e2e

PAN = "4242424242424242"


def confirmation_rows(stack: Stack, order_id: str) -> list[tuple[Any, ...]]:
    return stack.db(
        "payments",
        "SELECT type, transaction_id, amount, currency, brand, last4, outcome FROM confirmations"
        " WHERE order_id = %s",
        order_id,
    )


def audit(stack: Stack, order_id: str) -> list[tuple[Any, ...]]:
    """(action, outcome, reason) audited for an order — by its id, or for a confirmation
    rejected before its body could be trusted, by the record key the bridge gave it."""
    return stack.db(
        "orders",
        "SELECT action, outcome, reason FROM audit_log"
        " WHERE order_id = %s OR details->>'record_key' = %s ORDER BY id",
        order_id,
        order_id,
    )


def wait_audit(stack: Stack, order_id: str, entry: tuple[str, str, str | None]) -> None:
    wait_for(lambda: entry in audit(stack, order_id), what=f"audit {entry} for {order_id}")


def statuses(stack: Stack, order_id: str) -> list[str]:
    order = stack.order(order_id)
    return [h["status"] for h in order["history"]] if order else []


def stocked_order(stack: Stack, prefix: str = "ord", qty: int = 5) -> tuple[str, str, int]:
    order_id, intent = new_id(prefix), new_id("pi")
    stack.set_stock(f"sku-{order_id}", qty)
    total = stack.place_order(order_id, intent=intent)
    stack.wait_status(order_id, "PENDING_PAYMENT")
    return order_id, intent, total


def test_accepted_authorization_is_stored_and_confirmed(stack: Stack) -> None:
    order_id, intent, total = stocked_order(stack)
    txn = stack.pay(order_id, intent, total, "authorize")["transaction_id"]
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert [h["status"] for h in done["history"]] == [
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert done["transaction_id"] == txn
    assert (done["amount"], done["currency"]) == (total, "EUR")
    assert confirmation_rows(stack, order_id) == [
        ("payment.authorized", txn, total, "EUR", "visa", "4242", "accepted")
    ]
    records = wait_for(
        lambda: len(r := stack.status_records(order_id)) == 4 and r, what="4 records"
    )
    assert [r["version"] for r in records] == [1, 2, 3, 4]
    assert [r["previous_status"] for r in records] == [
        None,
        "PENDING_PAYMENT",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
    ]
    wait_audit(stack, order_id, ("confirmation", "accepted", None))


def test_accepted_sale_is_confirmed_without_capture(stack: Stack) -> None:
    order_id, intent, total = stocked_order(stack)
    txn = stack.pay(order_id, intent, total, "sale")["transaction_id"]
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert confirmation_rows(stack, order_id)[0][:2] == ("payment.captured", txn)
    ledger = stack.ledger(txn)
    assert ledger["state"] == "captured"
    assert ledger["refunds"] == []


def test_payment_failed_marks_order_failed_with_gateway_code(stack: Stack) -> None:
    order_id, intent, total = stocked_order(stack)
    stack.pay(order_id, intent, total, "decline")
    failed = stack.wait_status(order_id, "PAYMENT_FAILED")
    assert failed["reason"] == "card_declined"
    kinds = wait_for(lambda: stack.notifications(order_id), what="a notification")
    assert [n["kind"] for n in kinds] == ["payment_failed"]


def _signed(stack: Stack, order_id: str, intent: str, amount: int, **kw: Any) -> tuple[bytes, str]:
    sim = stack.pay(order_id, intent, amount, kw.pop("mode", "authorize"), deliver=False, **kw)
    return sim["body"].encode(), sim["signature"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_secret", "signature_invalid"),
        ("tampered_body", "signature_invalid"),
        ("too_old", "timestamp_outside_tolerance"),
        ("too_far_in_future", "timestamp_outside_tolerance"),
        ("no_signature_v1", "signature_missing"),
        ("amount_mismatch", "amount_mismatch"),
        ("currency_mismatch", "currency_mismatch"),
        ("cvv_key", "security_code_present"),
    ],
)
def test_rejected_confirmation_changes_nothing(stack: Stack, case: str, reason: str) -> None:
    order_id, intent, total = stocked_order(stack)
    body, sig = _signed(
        stack,
        order_id,
        intent,
        total + 1 if case == "amount_mismatch" else total,
        currency="USD" if case == "currency_mismatch" else "EUR",
        extra_data={"cvv": "123"} if case == "cvv_key" else None,
    )
    now = int(time.time())
    if case == "wrong_secret":
        sig = sign("whsec_not_ours", now, body)
    elif case == "tampered_body":
        body = body.replace(f'"amount":{total}'.encode(), f'"amount":{total - 1}'.encode())
        assert f'"amount":{total - 1}'.encode() in body
    elif case == "too_old":
        sig = sign("whsec_local_dev", now - 301 - 5, body)
    elif case == "too_far_in_future":
        sig = sign("whsec_local_dev", now + 301 + 5, body)
    elif case == "no_signature_v1":
        sig = f"t={now}"
    if case == "cvv_key":
        # the bridge refuses card data (422); payments must reject it too when some other
        # producer puts it on the topic
        assert stack.post_webhook(body, sig).status_code == 422
        headers = [("paysaga-gateway", b"simgw"), ("paysaga-signature", sig.encode())]
        asyncio.run(
            produce(stack.bootstrap, "gateway.confirmations.v1", [(order_id, body)], headers)
        )
    else:
        assert stack.post_webhook(body, sig).status_code == 202
    wait_audit(stack, order_id, ("confirmation", "rejected", reason))
    assert stack.order(order_id)["status"] == "PENDING_PAYMENT"  # type: ignore[index]
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]
    assert confirmation_rows(stack, order_id) == []


def test_unmatched_payment_is_matched_when_the_order_arrives(stack: Stack) -> None:
    order_id, intent = new_id("ord"), new_id("pi")
    stack.set_stock(f"sku-{order_id}", 5)
    txn = stack.pay(order_id, intent, 1000, "authorize")["transaction_id"]
    wait_for(
        lambda: (
            stack.db(
                "payments", "SELECT state FROM unmatched_payments WHERE transaction_id=%s", txn
            )
            == [("parked",)]
        ),
        what="parked unmatched payment",
    )
    assert stack.order(order_id) is None
    stack.place_order(order_id, intent=intent)
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert stack.db(
        "payments", "SELECT state FROM unmatched_payments WHERE transaction_id=%s", txn
    ) == [("matched",)]
    assert stack.ledger(txn)["state"] == "captured"


def test_unmatched_payment_never_matched_is_resolved_by_an_operator(stack: Stack) -> None:
    intent = new_id("pi")
    txn = stack.pay(None, intent, 2500, "authorize")["transaction_id"]
    row = wait_for(
        lambda: stack.db(
            "payments", "SELECT id FROM unmatched_payments WHERE transaction_id=%s", txn
        ),
        what="parked",
    )
    listed = paysaga(stack, "unmatched", "list")
    assert listed.returncode == 0
    assert txn in listed.stdout
    done = paysaga(stack, "unmatched", "resolve", str(row[0][0]), "--refund")
    assert done.returncode == 0, done.stdout + done.stderr
    assert stack.ledger(txn)["state"] == "voided"
    assert stack.db(
        "payments", "SELECT state FROM unmatched_payments WHERE transaction_id=%s", txn
    ) == [("resolved_refund",)]
    again = paysaga(stack, "unmatched", "resolve", str(row[0][0]), "--refund")
    assert again.returncode == 1  # nothing left to resolve; never a second void
    assert len(stack.ledger(txn)["voids"]) == 1
    wait_for(
        lambda: stack.db(
            "orders", "SELECT outcome FROM audit_log WHERE transaction_id=%s AND action=%s", txn,
            "operator_resolution",
        ) == [("resolved_refund",)],
        what="resolution audited",
    )  # fmt: skip


def test_unmatched_payment_attached_to_an_order_by_an_operator(stack: Stack) -> None:
    order_id, _intent, total = stocked_order(stack)
    other_intent = new_id("pi")  # e.g. the checkout lost track of the attempt it started
    txn = stack.pay(None, other_intent, total, "sale")["transaction_id"]
    row = wait_for(
        lambda: stack.db(
            "payments", "SELECT id FROM unmatched_payments WHERE transaction_id=%s", txn
        ),
        what="parked",
    )
    done = paysaga(stack, "unmatched", "resolve", str(row[0][0]), "--order", order_id)
    assert done.returncode == 0, done.stdout + done.stderr
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert stack.order(order_id)["transaction_id"] == txn  # type: ignore[index]


def test_duplicates_including_concurrent_ones_change_nothing(stack: Stack) -> None:
    order_id, intent, total = stocked_order(stack)
    body, sig = _signed(stack, order_id, intent, total)
    results: list[int] = []

    def post() -> None:
        results.append(stack.post_webhook(body, sig).status_code)

    threads = [threading.Thread(target=post) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results += [stack.post_webhook(body, sig).status_code for _ in range(5)]
    assert results == [202] * 10
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert len(confirmation_rows(stack, order_id)) == 1
    accepted = [h for h in statuses(stack, order_id) if h == "PAYMENT_AUTHORIZED"]
    assert accepted == ["PAYMENT_AUTHORIZED"]
    txn = json.loads(body)["data"]["transaction_id"]
    assert len(stack.ledger(txn)["captures"]) == 1


def test_confirmation_replayed_late_is_judged_by_its_record_time(stack: Stack) -> None:
    """A genuine confirmation appended 10 minutes ago (consumer lag, dead-letter replay)
    is accepted: the tolerance is measured against the record's timestamp."""
    order_id, intent, total = stocked_order(stack)
    body, _ = _signed(stack, order_id, intent, total)
    then = int(time.time()) - 600
    headers = [
        ("paysaga-gateway", b"simgw"),
        ("paysaga-signature", sign("whsec_local_dev", then, body).encode()),
    ]
    records: list[tuple[str | None, bytes]] = [(order_id, body)]
    asyncio.run(produce(stack.bootstrap, "gateway.confirmations.v1", records, headers, then * 1000))
    stack.wait_status(order_id, "PAID_CONFIRMED")


def test_resend_with_a_new_signature_after_a_rejected_delivery_is_accepted(stack: Stack) -> None:
    """A delivery rejected during a secret-rotation lag (signed with a secret payments
    does not know yet), then resent — same body, new signature: the resend is verified
    and accepted, not dropped as a duplicate of the rejected one."""
    order_id, intent, total = stocked_order(stack)
    body, _ = _signed(stack, order_id, intent, total)
    now = int(time.time())
    assert stack.post_webhook(body, sign("whsec_next", now, body)).status_code == 202
    wait_audit(stack, order_id, ("confirmation", "rejected", "signature_invalid"))
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]
    assert stack.post_webhook(body, sign("whsec_local_dev", now + 1, body)).status_code == 202
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert done["transaction_id"] == json.loads(body)["data"]["transaction_id"]
    assert len(confirmation_rows(stack, order_id)) == 1


def test_forged_copy_with_fresh_timestamp_is_rejected(stack: Stack) -> None:
    order_id, intent, total = stocked_order(stack)
    body, sig = _signed(stack, order_id, intent, total)
    signed_at, old_v1 = sig.removeprefix("t=").split(",v1=")
    # a captured signature replayed with a fresh t (still within the tolerance)
    forged = f"t={int(signed_at) + 7},v1={old_v1}"
    assert stack.post_webhook(body, forged).status_code == 202
    wait_audit(stack, order_id, ("confirmation", "rejected", "signature_invalid"))
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]


def test_secret_rotation_accepts_either_secret(stack: Stack) -> None:
    """The stack is configured with two secrets for simgw (see conftest): a body signed
    with the second one, and a header with a stale v1 next to a valid one, both pass."""
    order_id, intent, total = stocked_order(stack)
    body, _ = _signed(stack, order_id, intent, total)
    now = int(time.time())
    good = sign("whsec_rotated", now, body).split("v1=")[1]
    header = f"t={now},v1={'0' * 64},v1={good}"
    assert stack.post_webhook(body, header).status_code == 202
    stack.wait_status(order_id, "PAID_CONFIRMED")


def test_retry_with_another_method_after_a_decline(stack: Stack) -> None:
    order_id, intent, total = stocked_order(stack)
    stack.pay(order_id, intent, total, "decline")
    stack.wait_status(order_id, "PAYMENT_FAILED")
    wait_for(
        lambda: (
            stack.db("payments", "SELECT status FROM orders WHERE order_id=%s", order_id)
            == [("failed",)]
        ),
        what="payments knows the attempt failed",
    )
    second = new_id("pi")
    stack.retry(order_id, second, "wallet")
    stack.wait_status(order_id, "PENDING_PAYMENT")
    txn = stack.pay(order_id, second, total, "authorize")["transaction_id"]
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert done["payment_intent_id"] == second
    assert done["transaction_id"] == txn
    kinds = wait_for(
        lambda: len(n := stack.notifications(order_id)) == 2 and n, what="2 notifications"
    )
    assert sorted(n["kind"] for n in kinds) == ["payment_confirmed", "payment_failed"]


def unmatched_state(stack: Stack, txn: str) -> list[tuple[Any, ...]]:
    return stack.db("payments", "SELECT state FROM unmatched_payments WHERE transaction_id=%s", txn)


def test_payment_of_a_retry_ahead_of_the_retry_request_settles_the_retry(stack: Stack) -> None:
    """The customer's retry payment (intent pi_2) reaches payments before the
    PaymentRetryRequested that announces pi_2: it is parked, not rejected, and settles
    the new attempt when the retry arrives. A payment for the earlier attempt's intent
    is still rejected."""
    order_id, intent, total = stocked_order(stack)
    stack.pay(order_id, intent, total, "decline")
    stack.wait_status(order_id, "PAYMENT_FAILED")
    second = new_id("pi")
    txn = stack.pay(order_id, second, total, "authorize")["transaction_id"]
    wait_for(lambda: unmatched_state(stack, txn) == [("parked",)], what="retry payment parked")
    assert statuses(stack, order_id) == ["PENDING_PAYMENT", "PAYMENT_FAILED"]
    stack.retry(order_id, second, "wallet")
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert (done["payment_intent_id"], done["transaction_id"]) == (second, txn)
    assert unmatched_state(stack, txn) == [("matched",)]
    assert len(stack.ledger(txn)["captures"]) == 1
    records = wait_for(
        lambda: (r := stack.status_records(order_id)) and r[-1]["status"] == "PAID_CONFIRMED" and r,
        what="PAID_CONFIRMED on orders.status.v1",
    )
    assert records[-1]["transaction_id"] == txn
    # a payment for the failed attempt's intent is not parked: it is rejected
    late = stack.pay(order_id, intent, total, "authorize")["transaction_id"]
    wait_audit(stack, order_id, ("confirmation", "rejected", "payment_intent_mismatch"))
    assert unmatched_state(stack, late) == []
    assert (stack.order(order_id) or {})["transaction_id"] == txn


def test_retry_is_rejected_once_a_failed_attempt_needs_reconciliation(stack: Stack) -> None:
    """The capture is declined (PAYMENT_FAILED), then the void of the authorization is
    declined too (NEEDS_RECONCILIATION): payments refuses a retry while the failed
    attempt's authorization waits for an operator (one attempt's money held at a time).
    A retry payments accepted before the flag reached it is still applied by orders."""
    order_id, intent = new_id("ord"), new_id("pi") + "_capture_declined_void_declined"
    stack.set_stock(f"sku-{order_id}", 5)
    total = stack.place_order(order_id, intent=intent)
    stack.wait_status(order_id, "PENDING_PAYMENT")
    stack.pay(order_id, intent, total, "authorize")
    stack.wait_status(order_id, "NEEDS_RECONCILIATION")
    assert "PAYMENT_FAILED" in statuses(stack, order_id)
    wait_for(
        lambda: (
            stack.db("payments", "SELECT saga_status FROM orders WHERE order_id=%s", order_id)
            == [("NEEDS_RECONCILIATION",)]
        ),
        what="payments mirrored NEEDS_RECONCILIATION",
    )
    before = statuses(stack, order_id)
    stack.retry(order_id, new_id("pi"))
    wait_audit(stack, order_id, ("payment_retry", "rejected", "retry_not_allowed_in_status"))
    assert ("payment_retry", "retry_accepted", None) not in audit(stack, order_id)
    assert statuses(stack, order_id) == before
    assert stack.db("payments", "SELECT attempt FROM orders WHERE order_id=%s", order_id) == [(1,)]


def test_retry_is_rejected_unless_the_attempt_failed(stack: Stack) -> None:
    order_id, _intent, _total = stocked_order(stack)
    stack.retry(order_id, new_id("pi"))
    wait_audit(stack, order_id, ("payment_retry", "rejected", "retry_not_allowed_in_status"))
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]


def test_card_data_never_lands_anywhere(stack: Stack) -> None:
    """A confirmation carrying a card number: refused at the bridge (never enters Kafka),
    and — if some other producer puts it on the topic — rejected by payments without
    storing it. Afterwards no table, log file or derived topic holds the number."""
    order_id, intent, total = stocked_order(stack)
    body, sig = _signed(stack, order_id, intent, total, extra_data={"card": {"number": PAN}})
    assert PAN.encode() in body
    refused = stack.post_webhook(body, sig)
    assert refused.status_code == 422
    assert PAN not in refused.text
    # a misbehaving producer bypassing the bridge
    headers = [("paysaga-gateway", b"simgw"), ("paysaga-signature", sig.encode())]
    asyncio.run(
        produce(stack.bootstrap, "gateway.confirmations.v1", [(order_id, body)], headers=headers)
    )
    wait_audit(stack, order_id, ("confirmation", "rejected", "card_number_present"))
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]
    for service in ("payments", "orders", "inventory", "capture", "refunds"):
        dump = subprocess.run(
            [
                str(devstack.pg_bindir() / "pg_dump"),
                "--data-only",
                f"--port={devstack.PROFILES['test'].pg_port}",
                "--host=127.0.0.1",
                "--username=paysaga",
                f"paysaga_{service}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert PAN not in dump.stdout, f"card number stored in paysaga_{service}"
    # every process log of the stack (the broker's own data files are not logs: the
    # misbehaving producer above put the number on the input topic itself)
    test_root = REPO / ".local" / "test"
    logs = [*(test_root / "logs").glob("*.log"), test_root / "kafka" / "kafka.log"]
    for log in [*logs, test_root / "pg" / "postgres.log"]:
        if log.exists():
            assert PAN not in log.read_text(errors="replace"), f"card number in {log.name}"

    for topic in (
        "payments.events.v1",
        "audit.events.v1",
        "orders.status.v1",
        "paysaga.payments.dlq",
    ):
        for rec in asyncio.run(read_all(stack.bootstrap, topic)):
            assert PAN.encode() not in rec.value, f"card number on {topic}"


def _retries(stack: Stack) -> float:
    text = httpx.get(f"{stack.url('payments')}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("paysaga_retries_total{")
    )


@pytest.mark.chaos
def test_postgresql_down_during_processing_marks_nothing_until_stored(stack: Stack) -> None:
    """The confirmation reaches Kafka while payments' database is down: payments retries
    (visible in its metrics), stores nothing and marks nothing; when the database is back
    within the retry budget the order completes, once, with no dead letter."""
    profile = devstack.PROFILES["test"]
    if stack.database_url.rstrip("/") != profile.database_url:
        pytest.skip("stops the local test PostgreSQL; this run uses another server")
    order_id, intent, total = stocked_order(stack)
    before = _retries(stack)
    devstack.pg_down(profile)
    try:
        assert stack.pay(order_id, intent, total, "authorize")["transaction_id"]
        wait_for(
            lambda: _retries(stack) > before, what="payments retrying while PostgreSQL is down"
        )
    finally:
        devstack.pg_up(profile)
    stack.wait_status(order_id, "PAID_CONFIRMED", timeout=120)
    assert len(confirmation_rows(stack, order_id)) == 1
    assert stack.db(
        "payments", "SELECT count(*) FROM dead_letters WHERE order_key = %s", order_id
    ) == [(0,)]


@pytest.mark.chaos
def test_dead_lettered_confirmation_is_accepted_on_replay(stack: Stack) -> None:
    """PostgreSQL stays down past payments' retry budget: the genuine confirmation is
    dead-lettered and, once the database is back, its order is flagged
    (NEEDS_RECONCILIATION, record_dead_lettered). `paysaga dlq replay` of it then settles
    the attempt and the saga completes — the flag is not a reason to reject it."""
    profile = devstack.PROFILES["test"]
    if stack.database_url.rstrip("/") != profile.database_url:
        pytest.skip("stops the local test PostgreSQL; this run uses another server")
    order_id, intent, total = stocked_order(stack)

    def dead_letter() -> Any:
        recs = asyncio.run(read_all(stack.bootstrap, "paysaga.payments.dlq"))
        return next((r for r in recs if r.key == order_id.encode()), None)

    # a first (rejected) delivery on the order's partition, so that payments holds its
    # position and processes — and fails — the next record while the database is down
    body, _ = _signed(stack, order_id, intent, total)
    assert stack.post_webhook(body, sign("whsec_next", int(time.time()), body)).status_code == 202
    wait_audit(stack, order_id, ("confirmation", "rejected", "signature_invalid"))
    # and payments mirrored the order's PENDING_PAYMENT: were that status record still
    # on its way, it would be the one dead-lettered, and block the confirmation behind it
    wait_for(
        lambda: (
            stack.db("payments", "SELECT saga_status FROM orders WHERE order_id=%s", order_id)
            == [("PENDING_PAYMENT",)]
        ),
        what="payments mirrored PENDING_PAYMENT",
    )
    devstack.pg_down(profile)
    try:
        txn = stack.pay(order_id, intent, total, "authorize")["transaction_id"]
        dead = wait_for(dead_letter, timeout=180, what="the confirmation dead-lettered")
    finally:
        devstack.pg_up(profile)
    assert dict(dead.headers)["paysaga-dlq-original-topic"] == b"gateway.confirmations.v1"
    flagged = stack.wait_status(order_id, "NEEDS_RECONCILIATION", timeout=120)
    assert flagged["reason"] == "record_dead_lettered"
    assert confirmation_rows(stack, order_id) == []
    replayed = paysaga(stack, "dlq", "replay", f"{dead.topic}:{dead.partition}:{dead.offset}")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    done = stack.wait_status(order_id, "PAID_CONFIRMED")
    assert done["transaction_id"] == txn
    assert statuses(stack, order_id) == [
        "PENDING_PAYMENT",
        "NEEDS_RECONCILIATION",
        "PAYMENT_AUTHORIZED",
        "INVENTORY_RESERVED",
        "PAID_CONFIRMED",
    ]
    assert confirmation_rows(stack, order_id) == [
        ("payment.authorized", txn, total, "EUR", "visa", "4242", "accepted")
    ]
    assert len(stack.ledger(txn)["captures"]) == 1
