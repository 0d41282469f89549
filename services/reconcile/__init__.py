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

``check`` and ``requested_payments`` run them: ``stores.py`` reads, ``gateway.py`` asks the
gateway, ``rules.py`` judges (pure); the CLI (``services/cli.py``) prints the result.
"""

from __future__ import annotations

from services.reconcile import gateway, rules, stores
from services.reconcile.rules import Violation

__all__ = ["Violation", "check", "requested_payments"]


def check(gateway_url: str | None = None, order_ids: list[str] | None = None) -> list[Violation]:
    """Every violation; with ``order_ids`` the order rules look at those orders only (the
    stock rules are global invariants and always run)."""
    orders = stores.orders(order_ids)
    captures = stores.captures()
    confirmed = stores.accepted_confirmations()
    refunds = stores.refunds()
    out = rules.order_rules(orders, captures, stores.reservations(), confirmed, refunds)
    out += rules.stock_rules(stores.held_lines(), stores.stock())
    out += rules.outbox_rules(stores.dead_outbox_rows(order_ids))
    out += rules.unmatched_rules(stores.unsettled_unmatched_refunds(order_ids))
    if gateway_url:
        order_txns = {o.transaction_id for o in orders}
        stored = {t: state for t, state in captures.items() if t in order_txns}
        failed = stores.failed_compensations(order_ids)
        rejected = {
            r.transaction_id: r
            for r in stores.rejected_confirmations(order_ids)
            if r.transaction_id not in confirmed and r.transaction_id not in refunds
        }
        judged = {o.transaction_id for o in orders if o.status in rules.FINAL and o.transaction_id}
        with gateway.connect(gateway_url) as client:
            payments = gateway.look_up(
                client, {*stored, *judged, *(c.transaction_id for c in failed), *rejected}
            )
        out += rules.status_rules(orders, payments)
        out += rules.ledger_rules(stored, payments)
        out += rules.compensation_rules(failed, payments)
        out += rules.rejected_rules(list(rejected.values()), payments)
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
    violations: list[Violation] = []
    notices: list[Violation] = []
    with gateway.connect(gateway_url) as client:
        for r in filter(rules.abandoned, stores.open_payment_requests(order_ids)):
            txns = gateway.intent_transactions(client, r.payment_intent_id)
            if txns is None:
                continue  # the gateway holds nothing of a payment it does not know
            found = rules.requested_payment_finding(r, gateway.look_up(client, set(txns)))
            (violations if found.rule == "requested_payment_captured" else notices).append(found)
    return violations, notices
