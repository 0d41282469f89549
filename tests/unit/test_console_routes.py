"""The operator console's pages and guard, over fake reads and actions: status codes,
filters, escaping of hostile text, and the refusal of an action without the operator
token, without the page's CSRF token, or with a wrong secret."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from schemas.contract import OrderStatus
from services.monitor.domain import Deadlines
from services.orders.console import routes
from services.orders.console.actions import OperatorToken
from services.orders.console.dead_letters import DeadLetter
from services.orders.console.order_list import OrderFilter
from services.orders.console.order_page import compare_ledger, notifications
from services.orders.console.scrub import scrub
from services.reconcile import Violation
from services.runtime.cli_dlq import Filters

HOSTILE = "<script>alert('pwned')</script>"
AT = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
REF = "paysaga.payments.dlq:0:7"


def _order(order_id: str = "ord_c1", status: str = "PAID_CONFIRMED") -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": "cus_1",
        "status": status,
        "reason": None,
        "attempt": 1,
        "amount": 10000,
        "currency": "EUR",
        "payment_intent_id": "pi_c1",
        "transaction_id": "txn_c1",
        "created_at": AT,
        "updated_at": AT,
    }


@dataclass
class FakeReads:
    deadlines: Deadlines = field(
        default_factory=lambda: Deadlines(900, {OrderStatus.PAYMENT_AUTHORIZED: 60})
    )
    filters: list[OrderFilter] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)

    async def status_counts(self) -> dict[str, int]:
        return {"PAID_CONFIRMED": 3, "NEEDS_RECONCILIATION": 1}

    async def orders(self, f: OrderFilter, now: datetime) -> tuple[list[dict[str, Any]], bool]:
        self.filters.append(f)
        return [_order()], True

    async def timeline(self, order_id: str) -> dict[str, Any] | None:
        if order_id != "ord_c1":
            return None
        return {
            "order": _order(),
            "history": [
                {"version": 1, "status": "PENDING_PAYMENT", "reason": None, "at": AT},
                {"version": 2, "status": "PAID_CONFIRMED", "reason": HOSTILE[:20], "at": AT},
            ],
            "audit": [],
            "notifications": [],
            "confirmations": [],
            "requests": [],
            "unmatched": [],
            "reservations": [],
            "captures": [
                {
                    "transaction_id": "txn_c1",
                    "idempotency_key": "capture:txn_c1",
                    "amount": 10000,
                    "currency": "EUR",
                    "state": "captured",
                    "attempts": 1,
                    "next_attempt_at": None,
                    "last_error": None,
                    "created_at": AT,
                    "updated_at": AT,
                    "capture_id": "cap_1",
                    "outcome_reason": None,
                }
            ],
            "compensations": [],
            "dead_letters": [],
        }

    async def ledger(self, order: dict[str, Any], txns: list[str]) -> tuple[Any, Any, Any]:
        # the gateway shows the capture refunded behind our back
        payment = {
            "state": "refunded",
            "captures": [{"amount": 10000, "currency": "EUR"}],
            "refunds": [{"amount": 10000, "currency": "EUR"}],
        }
        return {"txn_c1": payment}, [], None

    async def stalled(self, now: datetime) -> list[dict[str, Any]]:
        return [_order("ord_stuck", "PAYMENT_AUTHORIZED")]

    async def needs_reconciliation(self) -> tuple[list[Any], list[Any], str]:
        flagged = {**_order("ord_flag", "NEEDS_RECONCILIATION"), "reason": "refund_failed"}
        found = Violation("compensation_failed", "ord_flag", "refund txn_c1 failed: captured")
        return [flagged], [found], "paysaga reconcile --gateway --order ..."

    async def unmatched(self) -> list[dict[str, Any]]:
        return []

    async def unmatched_one(self, unmatched_id: int) -> dict[str, Any] | None:
        return None

    async def dead_letters(self, filters: Filters) -> list[DeadLetter]:
        return [d for d in self.letters if filters.ref in (None, d.ref)]


@dataclass
class FakeActions:
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    async def dead_letter(self, action: str, ref: str, order_id: str | None, operator: str) -> str:
        self.calls.append((action, ref, order_id, operator))
        return f"{action}: 1 dead letter(s)"


def _letter() -> DeadLetter:
    return DeadLetter(
        ref=REF,
        group="paysaga.payments",
        error_class="HandlerError",
        error_message=HOSTILE,
        original="gateway.confirmations.v1:0:3",
        key="ord_c1",
        attempts="5",
        first_failure="2026-01-05T10:00:00Z",
        headers={"x-note": "<img src=x onerror=alert(1)>"},
        payload=scrub(b'{"note": "' + HOSTILE.encode() + b'"}'),
        state="open",
    )


def _client(token: str | None) -> tuple[TestClient, FakeReads, FakeActions]:
    reads, actions = FakeReads(letters=[_letter()]), FakeActions()
    app = FastAPI()
    routes.install(app, reads, actions, OperatorToken.parse(token))  # type: ignore[arg-type]
    return TestClient(app), reads, actions


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert m, "no CSRF field on the confirmation page"
    return m.group(1)


def test_orders_page_filters_counts_and_paging() -> None:
    client, reads, _ = _client(None)
    r = client.get(
        "/console/orders",
        params={
            "status": "PAID_CONFIRMED",
            "age": "15",
            "customer": "cus_1",
            "conference": " pycon26 ",
            "q": " pi_c1 ",
        },
    )
    assert r.status_code == 200
    assert reads.filters == [
        OrderFilter("PAID_CONFIRMED", 15, "cus_1", "pi_c1", 1, conference="pycon26")
    ]
    assert 'name="conference" id="conference" value="pycon26"' in r.text
    assert 'href="/console/orders/ord_c1"' in r.text
    assert "<b>4</b>" in r.text  # all statuses counted
    assert 'id="next"' in r.text  # a further page
    assert client.get("/console/orders", params={"page": "0"}).status_code == 422
    # a submitted form sends its empty fields
    r = client.get(
        "/console/orders",
        params={"status": "", "age": "", "customer": "", "conference": "", "q": "x"},
    )
    assert r.status_code == 200
    assert reads.filters[-1] == OrderFilter(q="x")
    assert client.get("/console/static/console.css").status_code == 200
    assert client.get("/console/", follow_redirects=False).status_code == 307


def test_order_page_shows_each_step_and_the_ledger_disagreement() -> None:
    client, _, _ = _client(None)
    r = client.get("/console/orders/ord_c1")
    assert r.status_code == 200
    assert r.text.count('class="step"') == 2
    assert "capture:txn_c1" in r.text
    # ours: refunded 0; the gateway: refunded 10000 — highlighted
    assert re.search(r'<tr class="differs"><td>txn_c1</td><td>refunded</td><td>refunded', r.text)
    assert "<script>" not in r.text
    assert client.get("/console/orders/ord_nope").status_code == 404


def test_notifications_come_from_the_projection_with_the_times_of_rows_kept() -> None:
    """Attempt 1's payment_failed row is pruned, attempt 2's kept: both are listed, the
    kept row's times on the latest attempt of its kind."""

    def row(kind: str, sent: datetime | None) -> dict[str, Any]:
        value = json.dumps({"payload": {"kind": kind}}).encode()
        return {"created_at": AT, "sent_at": sent, "value": value}

    notified = [[2, "payment_failed"], [1, "payment_failed"], [3, "payment_confirmed"]]
    listed = notifications(notified, [row("payment_failed", AT), row("payment_confirmed", None)])
    assert [(n["attempt"], n["kind"], n["kept"], n["sent_at"]) for n in listed] == [
        (1, "payment_failed", False, None),
        (2, "payment_failed", True, AT),
        (3, "payment_confirmed", True, None),
    ]
    assert notifications([], [row("refunded", AT)]) == []


def test_compare_ledger_marks_only_disagreements() -> None:
    t = {
        "captures": [{"transaction_id": "t", "amount": 5, "state": "captured"}],
        "compensations": [],
        "confirmations": [],
    }
    rows = compare_ledger(t, {"t": {"state": "captured", "captures": [{"amount": 5}]}})
    assert [(r["field"], r["differs"]) for r in rows] == [
        ("captured", False),
        ("refunded", False),
        ("voided", False),
    ]
    assert all(r["differs"] for r in compare_ledger(t, {"t": None}))
    sale = {
        "captures": [],
        "compensations": [],
        "confirmations": [
            {"transaction_id": "t", "amount": 5, "type": "payment.captured", "outcome": "accepted"}
        ],
    }
    captured = {"state": "captured", "captures": [{"amount": 5}]}
    assert not any(r["differs"] for r in compare_ledger(sale, {"t": captured}))


def test_stalled_and_reconciliation_pages() -> None:
    client, _, _ = _client(None)
    stalled = client.get("/console/stalled").text
    assert 'href="/console/orders/ord_stuck"' in stalled
    assert "PENDING_PAYMENT 900 s, PAYMENT_AUTHORIZED 60 s" in stalled  # the monitor's
    assert "NEEDS_RECONCILIATION 1 s" in stalled
    r = client.get("/console/reconciliation")
    assert r.status_code == 200
    assert "compensation_failed: refund txn_c1 failed: captured" in r.text
    assert "paysaga reconcile --gateway --order ..." in r.text


def test_hostile_dead_letter_is_shown_as_text() -> None:
    client, _, _ = _client(None)
    r = client.get("/console/dead-letters")
    assert r.status_code == 200
    assert "<script>" not in r.text
    assert "<img src=x" not in r.text
    assert "&lt;script&gt;alert(" in r.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in r.text
    r = client.get("/console/orders", params={"q": HOSTILE})
    assert "<script>" not in r.text


def test_scrub_redacts_card_data_and_hides_secrets() -> None:
    shown = scrub(
        b'{"note": "card 4111 1111 1111 1111", "client_secret": "pi_sec_123",'
        b' "nested": {"gateway_secret": "whsec_x"}, "order_id": "ord_1"}'
    )
    assert "4111" not in shown
    assert "pi_sec_123" not in shown
    assert "whsec_x" not in shown
    assert "ord_1" in shown


def test_actions_are_refused_without_the_console_token() -> None:
    client, _, actions = _client(None)
    page = client.get(f"/console/dead-letters/{REF}/replay")
    assert page.status_code == 200
    assert "Actions are disabled" in page.text
    assert 'name="csrf"' not in page.text
    r = client.post(f"/console/dead-letters/{REF}/replay", data={"operator_token": "x"})
    assert r.status_code == 403
    assert "PAYSAGA_CONSOLE_TOKEN" in r.text
    assert actions.calls == []


@pytest.mark.parametrize(
    ("csrf", "secret", "says"),
    [
        ("", "s3cret", "CSRF check failed"),
        ("0" * 64, "s3cret", "CSRF check failed"),
        (None, "wrong", "Wrong operator token"),
    ],
)
def test_actions_are_refused_without_csrf_or_with_a_wrong_secret(
    csrf: str | None, secret: str, says: str
) -> None:
    client, _, actions = _client("alice:s3cret")
    page = client.get(f"/console/dead-letters/{REF}/replay")
    form = {"csrf": _csrf(page.text) if csrf is None else csrf, "operator_token": secret}
    r = client.post(f"/console/dead-letters/{REF}/replay", data=form)
    assert r.status_code == 403
    assert says in r.text
    assert actions.calls == []


def test_csrf_token_of_another_session_is_refused() -> None:
    client, _, actions = _client("alice:s3cret")
    other, _, _ = _client("alice:s3cret")
    stolen = _csrf(other.get(f"/console/dead-letters/{REF}/purge").text)
    client.get("/console/orders")  # the victim's own session cookie
    r = client.post(
        f"/console/dead-letters/{REF}/purge", data={"csrf": stolen, "operator_token": "s3cret"}
    )
    assert r.status_code == 403
    assert actions.calls == []


def test_confirmed_action_runs_once_as_the_named_operator() -> None:
    client, _, actions = _client("alice:s3cret")
    page = client.get(f"/console/dead-letters/{REF}/replay")
    assert page.status_code == 200
    assert "paysaga dlq replay" in page.text
    cookie = page.headers["set-cookie"].lower()
    assert "samesite=strict" in cookie
    assert "httponly" in cookie
    r = client.post(
        f"/console/dead-letters/{REF}/replay",
        data={"csrf": _csrf(page.text), "operator_token": "s3cret"},
    )
    assert r.status_code == 200
    assert "replay: 1 dead letter(s)" in r.text
    assert actions.calls == [("replay", REF, "ord_c1", "alice")]
    assert client.get(f"/console/dead-letters/{REF}/explode").status_code == 404


def test_operator_token_format() -> None:
    assert OperatorToken.parse("alice:s:3") == OperatorToken("alice", "s:3")
    assert OperatorToken.parse("s3cret") == OperatorToken("console", "s3cret")
    assert OperatorToken.parse("") is None
