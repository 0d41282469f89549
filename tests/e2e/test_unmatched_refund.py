"""An operator refund of an unmatched payment whose answer is lost (ISSUE9 finding 1).

The gateway simulator applies the refund of a ``_refund_lost`` intent and holds its
answer back. Whether the command is killed while it waits or times out, the refund is
on record before the call: the order arriving later is never confirmed, the gateway's
ledger and the unmatched store agree, and running the command again settles it
without a second refund."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from services.devclient import wait_for
from tests.e2e.conftest import Stack, new_id, paysaga
from tests.support.harness import REPO

pytestmark = pytest.mark.e2e


def unmatched(stack: Stack, txn: str) -> list[tuple[Any, ...]]:
    return stack.db(
        "payments", "SELECT id, state FROM unmatched_payments WHERE transaction_id=%s", txn
    )


def statuses(stack: Stack, order_id: str) -> list[str]:
    order = stack.order(order_id)
    return [h["status"] for h in order["history"]] if order else []


def audited(stack: Stack, order_id: str) -> list[tuple[Any, ...]]:
    return stack.db(
        "orders",
        "SELECT action, outcome, reason, transaction_id FROM audit_log WHERE order_id=%s"
        " AND subject='unmatched_payment' ORDER BY id",
        order_id,
    )


def resolve_refund(unmatched_id: int) -> list[str]:
    return [
        str(REPO / ".venv" / "bin" / "paysaga"),
        "unmatched",
        "resolve",
        str(unmatched_id),
        "--refund",
    ]


def resolve_refund_killed_once_sent(stack: Stack, unmatched_id: int, txn: str) -> str | None:
    """The operator's process dies while it waits for the refund's answer."""
    proc = subprocess.Popen(
        resolve_refund(unmatched_id),
        env={**stack.env, "PAYSAGA_GATEWAY_TIMEOUT_S": "60"},  # still waiting when killed
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: stack.ledger(txn)["refunds"], what="the refund at the gateway")
        assert proc.poll() is None, "the command ended before it could be killed"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return None


def resolve_refund_timing_out(stack: Stack, unmatched_id: int, txn: str) -> str | None:
    """One attempt allowed, and the answer comes later than the client waits."""
    env = {**stack.env, "PAYSAGA_GATEWAY_MAX_ATTEMPTS": "1", "PAYSAGA_GATEWAY_TIMEOUT_S": "0.5"}
    done = subprocess.run(
        resolve_refund(unmatched_id),
        env={**env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr  # not settled: outcome unknown
    return done.stdout


@pytest.mark.parametrize(
    "lose_the_answer",
    [resolve_refund_killed_once_sent, resolve_refund_timing_out],
    ids=["killed", "timeout"],
)
def test_refunded_unmatched_sale_is_never_confirmed_when_its_order_arrives(
    stack: Stack, lose_the_answer: Any
) -> None:
    order_id, intent = new_id("ord"), f"{new_id('pi')}_refund_lost"
    stack.set_stock(f"sku-{order_id}", 5)
    txn = stack.pay(order_id, intent, 1000, "sale")["transaction_id"]
    [(unmatched_id, state)] = wait_for(lambda: unmatched(stack, txn), what="parked sale")
    assert state == "parked"

    said = lose_the_answer(stack, unmatched_id, txn)
    ledger = stack.ledger(txn)
    assert (ledger["state"], len(ledger["refunds"])) == ("refunded", 1)

    # the order arrives within the matching window, while the refund is pending
    stack.place_order(order_id, intent=intent)  # 1 x 1000 EUR: the sale's amount
    not_matched = ("unmatched_matched", "not_matched", "refund_pending", txn)
    wait_for(
        lambda: (
            not_matched in audited(stack, order_id) or "PAID_CONFIRMED" in statuses(stack, order_id)
        ),
        what="the order's arrival handled by payments",
    )
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]
    assert audited(stack, order_id) == [not_matched]
    # the store says what the gateway may have done: the refund is pending, not parked
    assert unmatched(stack, txn) == [(unmatched_id, "refund_pending")]
    if said is not None:
        assert "run the same command again" in said, said
    listed = paysaga(stack, "unmatched", "list")
    assert listed.returncode == 0
    [line] = [line for line in listed.stdout.splitlines() if txn in line]
    assert "refund_pending" in line, listed.stdout
    attach = paysaga(stack, "unmatched", "resolve", str(unmatched_id), "--order", order_id)
    assert attach.returncode == 1, attach.stdout + attach.stderr
    assert "refund is pending" in attach.stdout, attach.stdout

    # running the command again settles it from the gateway's record: no second refund
    again = paysaga(stack, "unmatched", "resolve", str(unmatched_id), "--refund")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "refunded" in again.stdout
    assert unmatched(stack, txn) == [(unmatched_id, "resolved_refund")]
    ledger = stack.ledger(txn)
    assert (ledger["state"], len(ledger["refunds"])) == ("refunded", 1)
    wait_for(
        lambda: (
            stack.db(
                "orders",
                "SELECT outcome FROM audit_log WHERE transaction_id=%s AND action=%s",
                txn,
                "operator_resolution",
            )
            == [("resolved_refund",)]
        ),
        what="resolution audited",
    )
    third = paysaga(stack, "unmatched", "resolve", str(unmatched_id), "--refund")
    assert third.returncode == 1  # nothing left to resolve
    assert len(stack.ledger(txn)["refunds"]) == 1
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]
    assert (
        stack.db("payments", "SELECT outcome FROM confirmations WHERE transaction_id=%s", txn) == []
    )


def test_voided_unmatched_authorization_whose_answer_is_lost_is_settled_once(
    stack: Stack,
) -> None:
    order_id, intent = new_id("ord"), f"{new_id('pi')}_void_lost"
    stack.set_stock(f"sku-{order_id}", 5)
    txn = stack.pay(order_id, intent, 1000, "authorize")["transaction_id"]
    [(unmatched_id, _)] = wait_for(lambda: unmatched(stack, txn), what="parked authorization")
    said = resolve_refund_timing_out(stack, unmatched_id, txn)
    assert "run the same command again" in (said or ""), said
    assert stack.ledger(txn)["state"] == "voided"
    assert unmatched(stack, txn) == [(unmatched_id, "refund_pending")]
    stack.place_order(order_id, intent=intent)
    not_matched = ("unmatched_matched", "not_matched", "refund_pending", txn)
    wait_for(
        lambda: (
            not_matched in audited(stack, order_id)
            or "PAYMENT_AUTHORIZED" in statuses(stack, order_id)
        ),
        what="the order's arrival handled by payments",
    )
    assert statuses(stack, order_id) == ["PENDING_PAYMENT"]
    again = paysaga(stack, "unmatched", "resolve", str(unmatched_id), "--refund")
    assert again.returncode == 0, again.stdout + again.stderr
    assert unmatched(stack, txn) == [(unmatched_id, "resolved_refund")]
    ledger = stack.ledger(txn)
    assert (ledger["state"], len(ledger["voids"]), ledger["captures"]) == ("voided", 1, [])


def test_declined_refund_parks_the_payment_again(stack: Stack) -> None:
    """The gateway refused: it holds the money, so the payment is matchable again."""
    order_id, intent = new_id("ord"), f"{new_id('pi')}_refund_declined"
    stack.set_stock(f"sku-{order_id}", 5)
    txn = stack.pay(order_id, intent, 1000, "sale")["transaction_id"]
    [(unmatched_id, _)] = wait_for(lambda: unmatched(stack, txn), what="parked sale")
    done = paysaga(stack, "unmatched", "resolve", str(unmatched_id), "--refund")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "declined" in done.stdout
    assert "parked again" in done.stdout
    assert unmatched(stack, txn) == [(unmatched_id, "parked")]
    assert stack.ledger(txn)["refunds"] == []
    stack.place_order(order_id, intent=intent)
    stack.wait_status(order_id, "PAID_CONFIRMED")
    assert unmatched(stack, txn) == [(unmatched_id, "matched")]


def test_reconcile_names_an_operator_refund_left_pending(stack: Stack) -> None:
    """A refund whose answer was lost leaves money in doubt until an operator settles it:
    reconcile names it (exit 1) until `unmatched resolve ID --refund` has settled it."""
    order_id, intent = new_id("ord"), f"{new_id('pi')}_refund_lost"
    txn = stack.pay(order_id, intent, 1000, "sale")["transaction_id"]
    [(unmatched_id, _)] = wait_for(lambda: unmatched(stack, txn), what="parked sale")
    assert paysaga(stack, "reconcile", "--order", order_id).returncode == 0
    resolve_refund_timing_out(stack, unmatched_id, txn)
    assert unmatched(stack, txn) == [(unmatched_id, "refund_pending")]

    found = paysaga(stack, "reconcile", "--order", order_id)
    assert found.returncode == 1, found.stdout + found.stderr
    [line] = [ln for ln in found.stdout.splitlines() if "unmatched_refund_pending" in ln]
    assert txn in line, found.stdout
    assert f"resolve {unmatched_id} --refund" in found.stdout, found.stdout

    again = paysaga(stack, "unmatched", "resolve", str(unmatched_id), "--refund")
    assert again.returncode == 0, again.stdout + again.stderr
    settled = paysaga(stack, "reconcile", "--order", order_id)
    assert settled.returncode == 0, settled.stdout + settled.stderr


def test_declined_refund_names_the_order_that_arrived_while_it_was_pending(
    stack: Stack,
) -> None:
    """The order arrives while the refund is pending (not matched: its money may be gone),
    then the gateway declines the refund: the money is held and the payment parked again,
    but its order will not arrive a second time — the operator is told which order it is,
    and attaching it pays the order."""
    order_id, intent = new_id("ord"), f"{new_id('pi')}_refund_declined_slow"
    stack.set_stock(f"sku-{order_id}", 5)
    txn = stack.pay(order_id, intent, 1000, "sale")["transaction_id"]
    [(unmatched_id, _)] = wait_for(lambda: unmatched(stack, txn), what="parked sale")
    resolve_refund_timing_out(stack, unmatched_id, txn)  # each call takes 2 s: in doubt
    stack.place_order(order_id, intent=intent)
    not_matched = ("unmatched_matched", "not_matched", "refund_pending", txn)
    wait_for(lambda: not_matched in audited(stack, order_id), what="arrival not matched")

    declined = subprocess.run(
        resolve_refund(unmatched_id),
        env={**stack.env, "PAYSAGA_GATEWAY_TIMEOUT_S": "10", "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert declined.returncode == 1, declined.stdout + declined.stderr
    assert "parked again" in declined.stdout, declined.stdout
    assert unmatched(stack, txn) == [(unmatched_id, "parked")]
    assert stack.ledger(txn)["refunds"] == []
    hint = f"resolve {unmatched_id} --order {order_id}"
    assert hint in " ".join(declined.stdout.split()), declined.stdout

    attach = paysaga(stack, "unmatched", "resolve", str(unmatched_id), "--order", order_id)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    stack.wait_status(order_id, "PAID_CONFIRMED")
