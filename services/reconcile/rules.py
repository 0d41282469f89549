"""The rules of ``paysaga reconcile`` (the list is in ``__init__.py``), pure: each takes
rows already read (``stores.py``) and the gateway's view of transactions (``gateway.py``:
``payments``, None for a transaction it does not know) and returns the violations."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the rules import nothing that does I/O
    from services.runtime.cli_outbox import DeadRow

#: the final statuses whose money the gateway's ledger must agree with
FINAL = ("PAID_CONFIRMED", "REFUNDED", "PAYMENT_FAILED")

Payments = dict[str, dict[str, Any] | None]


@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str
    subject: str
    detail: str


def total(entries: Any) -> int:
    """The summed amount of a gateway transaction's captures or refunds."""
    return sum(int(e.get("amount") or 0) for e in entries or [] if isinstance(e, dict))


def _captured_not_refunded(payment: dict[str, Any]) -> bool:
    return total(payment.get("captures")) > total(payment.get("refunds"))


def _shows(payment: dict[str, Any] | None) -> str:
    if payment is None:
        return "unknown to the gateway"
    totals = ", ".join(
        f"{len(payment.get(k) or [])} {k} ({total(payment.get(k))})"
        for k in ("captures", "refunds")
    )
    return f"gateway: {payment.get('state')}, {totals}, {len(payment.get('voids') or [])} voids"


# ---------------------------------------------------------------- the stores alone


def order_rules(
    orders: list[Any],
    captures: dict[str, str],
    reservations: dict[tuple[str, int], str],
    confirmed: set[str],
    refunds: dict[str, str],
) -> list[Violation]:
    out = []
    for o in orders:
        txn = o.transaction_id
        if o.status == "PAID_CONFIRMED":
            if captures.get(txn) not in ("captured", "sale_confirmed"):
                out.append(
                    Violation(
                        "paid_without_capture", o.order_id, f"capture of {txn}: {captures.get(txn)}"
                    )
                )
            if reservations.get((o.order_id, o.attempt)) not in ("reserved", "committed"):
                state = reservations.get((o.order_id, o.attempt))
                out.append(
                    Violation("paid_without_reservation", o.order_id, f"reservation: {state}")
                )
            if txn not in confirmed:
                out.append(
                    Violation(
                        "paid_without_confirmation",
                        o.order_id,
                        f"no accepted confirmation of {txn}",
                    )
                )
        elif o.status == "PAYMENT_FAILED" and txn is not None:
            if captures.get(txn) == "captured" and refunds.get(txn) != "succeeded":
                out.append(
                    Violation("failed_but_captured", o.order_id, f"{txn} captured, not refunded")
                )
        elif o.status == "REFUNDED" and refunds.get(txn) != "succeeded":
            out.append(
                Violation(
                    "refunded_without_refund", o.order_id, f"refund of {txn}: {refunds.get(txn)}"
                )
            )
    return out


def stock_rules(held_lines: list[Any], stock: list[Any]) -> list[Violation]:
    out = []
    held: dict[str, int] = {}
    for r in held_lines:
        for line in r.lines:
            held[line["sku"]] = held.get(line["sku"], 0) + int(line["quantity"])
    for s in stock:
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


def outbox_rules(dead: Sequence[DeadRow]) -> list[Violation]:
    return [
        Violation(
            "outbox_row_dead",
            r.key or "-",
            f"{r.service} outbox row {r.id} ({r.event_type} to {r.topic}, {r.size} bytes)"
            f" refused by Kafka: {r.error}; {r.blocked} later row(s) of its key wait"
            f" — `paysaga outbox retry {r.service} {r.id}` once fixed",
        )
        for r in dead
    ]


def unmatched_rules(pending: list[Any]) -> list[Violation]:
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
    ]


# ---------------------------------------------------------------- against the gateway


def status_rules(orders: list[Any], payments: Payments) -> list[Violation]:
    """Each final order's transaction as the gateway shows it (``payments``): PAID_CONFIRMED
    captured for the order's amount and currency, neither refunded nor voided; REFUNDED
    given back (its captures refunded in full, or an authorization voided); PAYMENT_FAILED
    holding no captured money."""
    out = []
    for o in orders:
        txn = o.transaction_id
        if o.status not in FINAL or txn is None:
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
            captured = total(p["captures"])
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


def ledger_rules(captures: dict[str, str], payments: Payments) -> list[Violation]:
    """Our stored captures against the gateway's ledger: none missing, none doubled."""
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


def rejected_rules(rejected: list[Any], payments: Payments) -> list[Violation]:
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


def compensation_rules(failed: list[Any], payments: Payments) -> list[Violation]:
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


def abandoned(request: Any) -> bool:
    """A requested payment paysaga no longer waits on: an earlier attempt's, or one of an
    attempt that ended without it (failed, flagged)."""
    return request.payment_intent_id != request.current_intent or request.status in (
        "failed",
        "flagged",
    )


def requested_payment_finding(request: Any, payments: Payments) -> Violation:
    """``requested_payment_captured`` when an abandoned requested payment holds captured
    money not refunded, else the notice ``requested_payment_abandoned`` (naming an
    authorization still held, which lapses at the gateway)."""
    held = [p for p in payments.values() if p is not None]
    subject = f"attempt {request.attempt} ({request.payment_intent_id})"
    captured = [p["transaction_id"] for p in held if compensation_outstanding("refund", p)]
    if captured:
        detail = f"{subject}: {', '.join(captured)} captured, not refunded"
        return Violation("requested_payment_captured", request.order_id, detail)
    authorized = [p["transaction_id"] for p in held if p.get("state") == "authorized"]
    detail = f"{subject}: no captured money" + (
        f"; authorization held: {', '.join(authorized)}" if authorized else ""
    )
    return Violation("requested_payment_abandoned", request.order_id, detail)
