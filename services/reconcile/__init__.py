"""``paysaga reconcile``: the rules of docs/contract.md §3.1, checked across every store.

Each service owns its database, so no single query can see a violation: this reads
each store (read-only) and compares. Rules:

* ``paid_without_capture`` — PAID_CONFIRMED without a stored capture (or captured sale)
  of that transaction;
* ``paid_without_reservation`` — PAID_CONFIRMED without the attempt's items reserved
  or sold;
* ``paid_without_confirmation`` — PAID_CONFIRMED without the accepted confirmation;
* ``failed_but_captured`` — PAYMENT_FAILED while the attempt's money was captured and
  not refunded;
* ``refunded_without_refund`` — REFUNDED without a succeeded refund;
* ``stock_oversold`` — reserved + sold above a SKU's stock, or reserved not matching
  the reservations held;
* ``outbox_row_dead`` — an outbox row Kafka refused for good (too large, say), set
  aside by the relay: it and the later events of its order wait for an operator
  (``paysaga outbox list|retry``);
* ``unmatched_refund_pending`` — an operator's void or refund of an unmatched payment
  (``paysaga unmatched resolve ID --refund``) is recorded but not settled: its answer
  was lost, so whether the gateway gave the money back is unknown until the same
  command is run again (it looks the payment up first, so nothing is sent twice);
* with ``--gateway``: ``compensation_failed`` — a void or refund that failed for good
  (CompensationFailed) while the gateway still holds the money: the authorization is
  still ``authorized``, or the capture is not fully refunded. The status projection may
  not show it (a failed void of an attempt the customer has since retried); an operator
  must settle it, after which the gateway's state clears the violation;
* with ``--gateway``: the gateway holds what each final status says —
  ``paid_but_not_held``: a PAID_CONFIRMED order whose transaction is not ``captured``
  at the gateway, or shows a refund or a void (refunded, voided, disputed outside
  paysaga, never captured, unknown); ``paid_amount_mismatch``: captured, but not for
  the order's amount and currency; ``refunded_not_at_gateway``: a REFUNDED order whose
  captured money is not fully refunded (or, never captured, whose authorization is not
  voided); ``failed_but_captured_at_gateway``: a PAYMENT_FAILED order whose transaction
  holds captured money not refunded;
* with ``--gateway``: ``captured_twice`` / ``refunded_twice`` in the gateway's ledger,
  ``capture_unknown_to_gateway`` — a capture we stored that the gateway lacks — and
  ``captured_but_rejected`` — money the gateway captured for a confirmation payments
  rejected (a sale of the wrong amount, a second payment of a paid order — on arrival,
  or when its order arrived after it was parked), never accepted nor refunded: nothing
  in the saga gives it back, an operator must;
* with ``--gateway``: ``requested_payment_captured`` — money captured through a payment
  paysaga requested (docs/contract.md §3.7) but no longer waits on (``requested_payments``,
  which also lists the abandoned ones that hold no money, as notices).

Orders still in flight are not violations; the monitor watches for stalls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg

from services.runtime.service import libpq_conninfo
from services.runtime.settings import DatabaseSettings


@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str
    subject: str
    detail: str


def _rows(service: str, sql: str) -> list[Any]:
    url = DatabaseSettings().url_for(service)
    with (
        psycopg.connect(libpq_conninfo(url), autocommit=True) as conn,
        conn.cursor(row_factory=psycopg.rows.namedtuple_row) as cur,
    ):
        cur.execute(sql)
        return cur.fetchall()


def check(gateway_url: str | None = None, order_ids: list[str] | None = None) -> list[Violation]:
    """Every violation; with ``order_ids`` the order rules look at those orders only (the
    stock rules are global invariants and always run)."""
    orders = _rows(
        "orders", "SELECT order_id, status, attempt, transaction_id, amount, currency FROM orders"
    )
    if order_ids:
        orders = [o for o in orders if o.order_id in set(order_ids)]
    captures = {
        r.transaction_id: r.state
        for r in _rows("capture", "SELECT transaction_id, state FROM captures")
    }
    reservations = {
        (r.order_id, r.attempt): r.state
        for r in _rows("inventory", "SELECT order_id, attempt, state FROM reservations")
    }
    confirmed = {
        r.transaction_id
        for r in _rows(
            "payments", "SELECT transaction_id FROM confirmations WHERE outcome = 'accepted'"
        )
    }
    refunds = {
        r.transaction_id: r.state
        for r in _rows(
            "refunds", "SELECT transaction_id, state FROM compensations WHERE action = 'refund'"
        )
    }
    out = list(_order_rules(orders, captures, reservations, confirmed, refunds))
    out += _stock_rules()
    out += _outbox_rules(order_ids)
    out += _unmatched_rules(order_ids)
    if gateway_url:
        order_txns = {o.transaction_id for o in orders}
        stored = {t: state for t, state in captures.items() if t in order_txns}
        failed = [
            c
            for c in _rows(
                "refunds",
                "SELECT order_id, transaction_id, action, failure_reason FROM compensations"
                " WHERE state = 'failed' ORDER BY order_id, transaction_id, action",
            )
            if not order_ids or c.order_id in order_ids
        ]
        rejected = {
            r.transaction_id: r
            for r in _rows(
                "orders",
                "SELECT DISTINCT ON (transaction_id) transaction_id, order_id, reason"
                " FROM audit_log WHERE subject IN ('gateway_confirmation', 'unmatched_payment')"
                " AND outcome = 'rejected' AND transaction_id IS NOT NULL",
            )
            if r.transaction_id not in confirmed
            and r.transaction_id not in refunds
            and (not order_ids or r.order_id in order_ids)
        }
        judged = {o.transaction_id for o in orders if o.status in _FINAL and o.transaction_id}
        payments = _look_up(
            gateway_url, {*stored, *judged, *(c.transaction_id for c in failed), *rejected}
        )
        out += status_rules(orders, payments)
        out += _gateway_rules(stored, payments)
        out += _compensation_rules(failed, payments)
        out += _rejected_rules(list(rejected.values()), payments)
    return out


def _order_rules(
    orders: list[Any],
    captures: dict[str, str],
    reservations: dict[tuple[str, int], str],
    confirmed: set[str],
    refunds: dict[str, str],
) -> Iterator[Violation]:
    for o in orders:
        txn = o.transaction_id
        if o.status == "PAID_CONFIRMED":
            if captures.get(txn) not in ("captured", "sale_confirmed"):
                yield Violation(
                    "paid_without_capture", o.order_id, f"capture of {txn}: {captures.get(txn)}"
                )
            if reservations.get((o.order_id, o.attempt)) not in ("reserved", "committed"):
                state = reservations.get((o.order_id, o.attempt))
                yield Violation("paid_without_reservation", o.order_id, f"reservation: {state}")
            if txn not in confirmed:
                yield Violation(
                    "paid_without_confirmation", o.order_id, f"no accepted confirmation of {txn}"
                )
        elif o.status == "PAYMENT_FAILED" and txn is not None:
            if captures.get(txn) == "captured" and refunds.get(txn) != "succeeded":
                yield Violation("failed_but_captured", o.order_id, f"{txn} captured, not refunded")
        elif o.status == "REFUNDED" and refunds.get(txn) != "succeeded":
            yield Violation(
                "refunded_without_refund", o.order_id, f"refund of {txn}: {refunds.get(txn)}"
            )


def _stock_rules() -> list[Violation]:
    out = []
    held: dict[str, int] = {}
    for r in _rows("inventory", "SELECT lines FROM reservations WHERE state = 'reserved'"):
        for line in r.lines:
            held[line["sku"]] = held.get(line["sku"], 0) + int(line["quantity"])
    for s in _rows("inventory", "SELECT sku, available, reserved, sold FROM stock"):
        if s.reserved + s.sold > s.available or s.reserved < 0:
            out.append(
                Violation(
                    "stock_oversold",
                    s.sku,
                    f"available {s.available}, reserved {s.reserved}, sold {s.sold}",
                )
            )
        if s.reserved != held.get(s.sku, 0):
            out.append(
                Violation(
                    "stock_oversold",
                    s.sku,
                    f"reserved {s.reserved} but reservations hold {held.get(s.sku, 0)}",
                )
            )
    return out


def _outbox_rules(order_ids: list[str] | None) -> list[Violation]:
    from services.runtime.cli_outbox import dead_rows
    from services.runtime.settings import SERVICES

    return [
        Violation(
            "outbox_row_dead",
            r.key or "-",
            f"{r.service} outbox row {r.id} ({r.event_type} to {r.topic}, {r.size} bytes)"
            f" refused by Kafka: {r.error}; {r.blocked} later row(s) of its key wait"
            f" — `paysaga outbox retry {r.service} {r.id}` once fixed",
        )
        for service in SERVICES
        for r in dead_rows(service)
        if not order_ids or r.key in order_ids
    ]


def _unmatched_rules(order_ids: list[str] | None) -> list[Violation]:
    pending = _rows(
        "payments",
        "SELECT id, type, transaction_id, order_id, amount, currency, refund_key,"
        " refund_requested_at FROM unmatched_payments WHERE state = 'refund_pending' ORDER BY id",
    )
    return [
        Violation(
            "unmatched_refund_pending",
            r.order_id or r.transaction_id,
            f"{'void' if r.type == 'payment.authorized' else 'refund'} of {r.transaction_id}"
            f" ({r.amount} {r.currency}, key {r.refund_key}) unsettled since"
            f" {r.refund_requested_at:%Y-%m-%d %H:%M:%S}; `paysaga unmatched resolve {r.id}"
            " --refund` settles it",
        )
        for r in pending
        if not order_ids or r.order_id in order_ids
    ]


def _look_up(gateway_url: str, txns: set[str]) -> dict[str, dict[str, Any] | None]:
    """The gateway's view of each transaction (``GET /v1/payments/{id}``); None for one
    it does not know."""
    out: dict[str, dict[str, Any] | None] = {}
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        for txn in sorted(txns):
            answer = client.get(f"/v1/payments/{txn}")
            if answer.status_code == 404:
                out[txn] = None
                continue
            answer.raise_for_status()
            out[txn] = answer.json()
    return out


def _total(entries: Any) -> int:
    return sum(int(e.get("amount") or 0) for e in entries or [] if isinstance(e, dict))


def _captured_not_refunded(payment: dict[str, Any]) -> bool:
    return _total(payment.get("captures")) > _total(payment.get("refunds"))


def _shows(payment: dict[str, Any] | None) -> str:
    if payment is None:
        return "unknown to the gateway"
    totals = ", ".join(
        f"{len(payment.get(k) or [])} {k} ({_total(payment.get(k))})"
        for k in ("captures", "refunds")
    )
    return f"gateway: {payment.get('state')}, {totals}, {len(payment.get('voids') or [])} voids"


# the final statuses whose money the gateway's ledger must agree with
_FINAL = ("PAID_CONFIRMED", "REFUNDED", "PAYMENT_FAILED")


def status_rules(orders: list[Any], payments: dict[str, dict[str, Any] | None]) -> list[Violation]:
    """Each final order's transaction as the gateway shows it (``payments``): PAID_CONFIRMED
    captured for the order's amount and currency, neither refunded nor voided; REFUNDED
    given back (its captures refunded in full, or an authorization voided); PAYMENT_FAILED
    holding no captured money."""
    out = []
    for o in orders:
        txn = o.transaction_id
        if o.status not in _FINAL or txn is None:
            continue
        p = payments.get(txn)
        detail = f"{txn}: {_shows(p)}"
        if o.status == "PAID_CONFIRMED":
            held = (
                p is not None
                and p.get("state") == "captured"
                and bool(p.get("captures"))
                and not p.get("refunds")
                and not p.get("voids")
            )
            if p is None or not held:
                out.append(Violation("paid_but_not_held", o.order_id, detail))
                continue
            captured = _total(p["captures"])
            currencies = "/".join(sorted({str(c.get("currency")) for c in p["captures"]}))
            if (captured, currencies) != (o.amount, o.currency):
                detail = f"{txn}: captured {captured} {currencies}, order {o.amount} {o.currency}"
                out.append(Violation("paid_amount_mismatch", o.order_id, detail))
        elif o.status == "REFUNDED":
            given_back = p is not None and (
                not _captured_not_refunded(p) and bool(p.get("refunds"))
                if p.get("captures")
                else p.get("state") == "voided" or bool(p.get("voids"))
            )
            if not given_back:
                out.append(Violation("refunded_not_at_gateway", o.order_id, detail))
        elif p is not None and _captured_not_refunded(p):
            out.append(Violation("failed_but_captured_at_gateway", o.order_id, detail))
    return out


def _gateway_rules(
    captures: dict[str, str], payments: dict[str, dict[str, Any] | None]
) -> list[Violation]:
    out = []
    for txn, state in captures.items():
        payment = payments[txn]
        if payment is None:
            if state == "captured":
                out.append(Violation("capture_unknown_to_gateway", txn, "gateway: 404"))
            continue
        if len(payment.get("captures", [])) > 1:
            out.append(Violation("captured_twice", txn, f"{len(payment['captures'])} captures"))
        if len(payment.get("refunds", [])) > 1:
            out.append(Violation("refunded_twice", txn, f"{len(payment['refunds'])} refunds"))
    return out


def _rejected_rules(
    rejected: list[Any], payments: dict[str, dict[str, Any] | None]
) -> list[Violation]:
    out = []
    for r in rejected:
        payment = payments[r.transaction_id]
        if payment is not None and payment.get("captures") and not payment.get("refunds"):
            detail = f"{r.transaction_id} captured; its confirmation was rejected ({r.reason})"
            out.append(Violation("captured_but_rejected", r.order_id or "-", detail))
    return out


def compensation_outstanding(action: str, payment: dict[str, Any]) -> bool:
    """Whether the gateway still holds the money a failed compensation was to give back:
    a void whose authorization is still ``authorized``; a refund of a transaction whose
    captures exceed its refunds."""
    if action == "void":
        return payment.get("state") == "authorized"
    return _captured_not_refunded(payment)


def _compensation_rules(
    failed: list[Any], payments: dict[str, dict[str, Any] | None]
) -> list[Violation]:
    out = []
    for c in failed:
        payment = payments[c.transaction_id]
        # the gateway holds nothing of a transaction it does not know
        if payment is not None and compensation_outstanding(c.action, payment):
            detail = (
                f"{c.action} of {c.transaction_id} failed ({c.failure_reason});"
                f" gateway: {payment.get('state')}"
            )
            out.append(Violation("compensation_failed", c.order_id, detail))
    return out


def requested_payments(
    gateway_url: str, order_ids: list[str] | None = None
) -> tuple[list[Violation], list[Violation]]:
    """(violations, notices) about payments paysaga requested from the gateway (docs/contract.md
    §3.7) that it no longer waits on: an earlier attempt's, or one of an attempt that
    ended without it (failed, flagged). ``requested_payment_captured`` — the gateway
    captured money through it that is not refunded: a violation, an operator refunds it.
    ``requested_payment_abandoned`` — it holds no captured money: a notice only (an
    authorization hold, if any, is named in the detail and lapses at the gateway)."""
    rows = _rows(
        "payments",
        "SELECT r.order_id, r.attempt, r.payment_intent_id, o.status, o.attempt AS current,"
        " o.payment_intent_id AS current_intent"
        " FROM payment_requests r JOIN orders o USING (order_id)"
        " WHERE r.state = 'requested' ORDER BY r.order_id, r.attempt",
    )
    abandoned = [
        r
        for r in rows
        if (not order_ids or r.order_id in order_ids)
        and (r.payment_intent_id != r.current_intent or r.status in ("failed", "flagged"))
    ]
    violations, notices = [], []
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        for r in abandoned:
            answer = client.get(f"/v1/payment_intents/{r.payment_intent_id}")
            if answer.status_code == 404:
                continue  # the gateway holds nothing of a payment it does not know
            answer.raise_for_status()
            txns = [t for t in answer.json().get("transactions") or [] if isinstance(t, str)]
            payments = _look_up(gateway_url, set(txns))
            held = [p for p in payments.values() if p is not None]
            subject = f"attempt {r.attempt} ({r.payment_intent_id})"
            captured = [p["transaction_id"] for p in held if compensation_outstanding("refund", p)]
            if captured:
                detail = f"{subject}: {', '.join(captured)} captured, not refunded"
                violations.append(Violation("requested_payment_captured", r.order_id, detail))
                continue
            authorized = [p["transaction_id"] for p in held if p.get("state") == "authorized"]
            detail = f"{subject}: no captured money" + (
                f"; authorization held: {', '.join(authorized)}" if authorized else ""
            )
            notices.append(Violation("requested_payment_abandoned", r.order_id, detail))
    return violations, notices
