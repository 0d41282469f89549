"""The saga in memory: the five services' pure domains composed over a fake bus.

Used by the property tests (tests/unit/test_properties_saga.py). Nothing here does I/O;
each service class mirrors what its handlers and worker do around the pure functions
(services/*/handlers.py, worker.py, store.py), and the bus models what the real system
guarantees and no more:

- records of one topic with one key arrive in order (one partition); across topics and
  keys there is no order: the caller picks which (group, topic, key) delivers next;
- a record may be delivered again, any time later (an outbox relay re-publishing after
  a crash, a zombie consumer around a rebalance): each group's inbox dedupes by the
  envelope's event id, as ``services/runtime/consumer.py`` does; a webhook record by
  its delivery (the bridge's bytes + signature), and payments then by gateway event id
  and by (transaction, type);
- a record that a handler fails permanently goes to the group's dead letters (the
  runtime would then park the key's later records: here any dead letter of a saga
  event is reported as a violation by the caller).

Gateway calls go to ``FakeGateway``: the simulator's ledger and idempotency-key
semantics, with per-(transaction, operation) scripts of what each call does (``ok``,
``declined``, ``unavailable``: not applied, answer unknown; ``lost``: applied, answer
lost). Worker rounds are driven by the caller too, and a round may "crash" after its
gateway call and before storing the outcome (its row is then reclaimed, looked up first).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from schemas.envelope import event_type_of
from services.capture import domain as capture
from services.inventory import domain as inventory
from services.orders import domain as orders
from services.payments import domain as payments
from services.refunds import domain as refunds
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.retry import RetryPolicy
from services.runtime.topics import (
    CAPTURE_TOPIC,
    CATALOG_TOPIC,
    CHECKOUT_ORDERS_TOPIC,
    CONFIRMATIONS_TOPIC,
    INVENTORY_TOPIC,
    PAYMENTS_TOPIC,
    REFUNDS_TOPIC,
    STATUS_TOPIC,
)


def examples(n: int) -> int:
    """``n`` Hypothesis examples, times ``PAYSAGA_PROPERTY_SCALE`` (default 1: the bounded
    run of ``make test``; e.g. 20 for a long hunt)."""
    return n * int(os.environ.get("PAYSAGA_PROPERTY_SCALE", "1"))


NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
RETRY = RetryPolicy(max_attempts=3, base_s=1, max_s=4, stalled_max_s=8)
CAPTURE_POLICY = capture.CapturePolicy(hold=timedelta(days=6), retry=RETRY)
GATEWAY = "simgw"
CURRENCY = "EUR"
CONTEXT_FIELDS = (
    "order_id",
    "attempt",
    "payment_intent_id",
    "transaction_id",
    "flow",
    "amount",
    "currency",
    "gateway",
)

Behaviour = Literal["ok", "declined", "unavailable", "lost"]
PaymentKind = Literal["authorize", "sale", "decline"]

#: group -> topic -> the event types it routes (the services' HANDLERS / routes)
SUBSCRIPTIONS: dict[str, dict[str, frozenset[str] | None]] = {
    "payments": {CHECKOUT_ORDERS_TOPIC: None, CONFIRMATIONS_TOPIC: None, STATUS_TOPIC: None},
    "inventory": {
        CATALOG_TOPIC: None,
        PAYMENTS_TOPIC: frozenset({"PaymentAccepted"}),
        CAPTURE_TOPIC: frozenset(
            {"PaymentCaptured", "SaleConfirmed", "CaptureDeclined", "AuthorizationExpired"}
        ),
    },
    "capture": {INVENTORY_TOPIC: frozenset({"StockReserved"})},
    "refunds": {
        INVENTORY_TOPIC: frozenset({"StockReservationFailed"}),
        CAPTURE_TOPIC: frozenset({"CaptureDeclined", "AuthorizationExpired"}),
    },
    "orders": {
        PAYMENTS_TOPIC: None,
        INVENTORY_TOPIC: None,
        CAPTURE_TOPIC: None,
        REFUNDS_TOPIC: None,
    },
}


# --- scenario -----------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptSpec:
    """One payment attempt as the gateway will treat it."""

    kind: PaymentKind
    capture: tuple[Behaviour, ...] = ()
    void: tuple[Behaviour, ...] = ()
    refund: tuple[Behaviour, ...] = ()


@dataclass(frozen=True)
class OrderSpec:
    order_id: str
    items: tuple[tuple[str, int], ...]
    unit_amount: int
    attempts: tuple[AttemptSpec, ...]  # the first, then one per customer retry

    @property
    def total(self) -> int:
        return sum(q for _, q in self.items) * self.unit_amount


@dataclass(frozen=True)
class Scenario:
    stock: tuple[tuple[str, int], ...]
    orders: tuple[OrderSpec, ...]


def intent_of(order_id: str, attempt: int) -> str:
    return f"pi_{order_id}_{attempt}"


def txn_of(order_id: str, attempt: int) -> str:
    return f"txn_{order_id}_{attempt}"


# --- bus ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    topic: str
    key: str
    event_id: str  # the inbox key: the envelope's event id, or a webhook's delivery
    event_type: str
    payload: dict[str, Any]
    saga_seq: int | None = None
    causation_id: str | None = None


class Bus:
    def __init__(self) -> None:
        self.logs: dict[tuple[str, str], list[Msg]] = defaultdict(list)
        self.cursors: dict[tuple[str, str, str], int] = defaultdict(int)
        self.published: list[Msg] = []

    def publish(self, msg: Msg) -> None:
        self.logs[(msg.topic, msg.key)].append(msg)
        self.published.append(msg)

    def republish(self, msg: Msg) -> None:
        """The same record again, later in its partition."""
        self.logs[(msg.topic, msg.key)].append(msg)

    def pending(self) -> list[tuple[str, str, str]]:
        """(group, topic, key) with a record not yet delivered to that group."""
        return [
            (group, topic, key)
            for group, topics in SUBSCRIPTIONS.items()
            for (topic, key), log in self.logs.items()
            if topic in topics and self.cursors[(group, topic, key)] < len(log)
        ]

    def take(self, group: str, topic: str, key: str) -> Msg:
        cursor = self.cursors[(group, topic, key)]
        self.cursors[(group, topic, key)] = cursor + 1
        return self.logs[(topic, key)][cursor]


# --- gateway ------------------------------------------------------------------------


@dataclass
class GatewayTxn:
    order_id: str
    payment_intent_id: str
    amount: int
    currency: str
    state: str
    captures: list[dict[str, Any]] = field(default_factory=list)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    voids: list[dict[str, Any]] = field(default_factory=list)


class Conflict(Exception):
    """A 409 or 400: outside the contract (the worker retries, looking up first)."""


class FakeGateway:
    """The simulator's semantics (services/gatewaysim/ledger.py), scripted per call."""

    def __init__(self) -> None:
        self.txns: dict[str, GatewayTxn] = {}
        self.replies: dict[str, tuple[tuple[Any, ...], GatewayOutcome]] = {}
        self.scripts: dict[tuple[str, str], list[Behaviour]] = {}
        self.ids = itertools.count(1)

    def create(self, txn: str, order_id: str, intent: str, amount: int, kind: PaymentKind) -> None:
        state = {"authorize": "authorized", "sale": "captured", "decline": "failed"}[kind]
        t = GatewayTxn(order_id, intent, amount, CURRENCY, state)
        if kind == "sale":
            t.captures.append(
                {"capture_id": f"cap_{next(self.ids)}", "amount": amount, "currency": CURRENCY}
            )
        self.txns[txn] = t

    def get_payment(self, txn: str) -> dict[str, Any] | None:
        t = self.txns.get(txn)
        if t is None:
            return None
        return {
            "state": t.state,
            "captures": [dict(c) for c in t.captures],
            "refunds": [dict(r) for r in t.refunds],
            "voids": [dict(v) for v in t.voids],
        }

    def operate(
        self, op: str, txn: str, key: str, amount: int | None = None, currency: str | None = None
    ) -> GatewayOutcome:
        t = self.txns.get(txn)
        if t is None:
            return GatewayOutcome("not_found")
        fingerprint = (op, txn, amount, currency)
        if (stored := self.replies.get(key)) is not None:
            if stored[0] != fingerprint:
                raise Conflict("idempotency_key_reused")
            return stored[1]
        script = self.scripts.get((txn, op), [])
        behaviour: Behaviour = script.pop(0) if script else "ok"
        if behaviour == "unavailable":
            return GatewayOutcome("unknown", reason="http_503")
        outcome = self._apply(op, t, amount, currency, behaviour == "declined")
        self.replies[key] = (fingerprint, outcome)
        if behaviour == "lost" and outcome.kind == "succeeded":
            return GatewayOutcome("unknown", reason="timeout")
        return outcome

    def _apply(
        self, op: str, t: GatewayTxn, amount: int | None, currency: str | None, declined: bool
    ) -> GatewayOutcome:
        if op == "void":
            if t.state == "voided":
                return GatewayOutcome("succeeded", {"status": "voided"})
            if t.state != "authorized":
                raise Conflict("invalid_state")
            if declined:
                return GatewayOutcome("declined", code="void_declined")
            t.voids.append({"void_id": f"void_{next(self.ids)}"})
            t.state = "voided"
            return GatewayOutcome("succeeded", {"status": "voided"})
        if op == "capture" and t.state != "authorized":
            raise Conflict("already_captured" if t.state == "captured" else "invalid_state")
        if op == "refund" and t.state == "refunded":
            raise Conflict("already_refunded")
        if op == "refund" and t.state != "captured":
            return GatewayOutcome("declined", code="not_captured")
        if currency != t.currency or amount != t.amount:
            raise Conflict("amount_invalid")
        if declined:
            return GatewayOutcome("declined", code=f"{op}_declined")
        if op == "refund":
            refund_id = f"re_{next(self.ids)}"
            t.refunds.append({"refund_id": refund_id, "amount": amount, "currency": currency})
            t.state = "refunded"
            return GatewayOutcome("succeeded", {"refund_id": refund_id})
        capture_id = f"cap_{next(self.ids)}"
        t.captures.append({"capture_id": capture_id, "amount": amount, "currency": currency})
        t.state = "captured"
        return GatewayOutcome("succeeded", {"capture_id": capture_id})


# --- the services -------------------------------------------------------------------


class Service:
    group: str

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        self.inbox: set[str] = set()

    def emit(
        self,
        topic: str,
        event_type: str,
        payload: dict[str, Any],
        *,
        cause: Msg | None,
        saga_seq: int | None = None,
        causation_id: str | None = None,
    ) -> str:
        """``Context.emit``: saga_seq defaults to the cause's + 1, causation to its id."""
        if saga_seq is None:
            saga_seq = (cause.saga_seq or 0) + 1 if cause is not None else 1
        if causation_id is None and cause is not None:
            causation_id = cause.event_id
        event_id = f"{self.group}-{next(self.saga.ids)}"
        self.saga.bus.publish(
            Msg(topic, payload["order_id"], event_id, event_type, payload, saga_seq, causation_id)
        )
        return event_id

    def dead_letter(self, msg: Msg, reason: str) -> None:
        self.saga.dead_letters.append((self.group, msg, reason))

    def deliver(self, msg: Msg) -> None:
        routed = SUBSCRIPTIONS[self.group][msg.topic]
        if routed is not None and msg.event_type not in routed:
            return  # skipped, never dead-lettered
        if msg.event_id in self.inbox:
            return  # duplicate
        self.inbox.add(msg.event_id)
        self.handle(msg)

    def handle(self, msg: Msg) -> None:
        raise NotImplementedError


def _context(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload[k] for k in CONTEXT_FIELDS}


@dataclass
class PaymentsOrder:
    order: payments.Order
    saga_status: str | None = None
    saga_version: int = 0
    pending_retry: dict[str, Any] | None = None


class Payments(Service):
    group = "payments"

    def __init__(self, saga: Saga) -> None:
        super().__init__(saga)
        self.orders: dict[str, PaymentsOrder] = {}
        self.seen: set[str] = set()
        self.confirmations: dict[tuple[str, str], tuple[str, int]] = {}
        self.unmatched: list[payments.Confirmation] = []  # parked
        self.closed: set[tuple[str, str]] = set()  # unmatched rows matched or rejected

    def handle(self, msg: Msg) -> None:
        if msg.topic == CONFIRMATIONS_TOPIC:
            self.on_confirmation(msg)
        elif msg.topic == STATUS_TOPIC:
            self.on_status_changed(msg)
        elif msg.event_type == "OrderPlaced":
            self.on_order_placed(msg)
        else:
            self.on_retry_requested(msg)

    def _apply(self, decision: payments.Decision, causation: str | None) -> None:
        for event in decision.events:
            self.emit(
                PAYMENTS_TOPIC,
                event_type_of(type(event)),
                event.model_dump(mode="json"),
                cause=None,
                saga_seq=1,
                causation_id=causation,
            )

    def on_order_placed(self, msg: Msg) -> None:
        p = msg.payload
        incoming = payments.Order(
            order_id=p["order_id"],
            customer_id=p["customer_id"],
            currency=p["currency"],
            total_amount=p["total_amount"],
            payment_intent_id=p["payment_intent_id"],
            payment_method=p["payment_method"],
            attempt=1,
            status="pending",
            items=tuple(payments.Item(i["sku"], i["quantity"]) for i in p["items"]),
            correlation_id=None,
            content_hash=repr(sorted(p.items())),
        )
        row = self.orders.get(incoming.order_id)
        decision = payments.decide_order_placed(row.order if row else None, incoming)
        if decision.order is not None and row is None:
            self.orders[incoming.order_id] = PaymentsOrder(decision.order)
        self._apply(decision, msg.event_id)
        if decision.outcome == "registered" and decision.order is not None:
            self._match_parked(decision.order)

    def _match_parked(self, order: payments.Order) -> None:
        parked = [c for c in self.unmatched if c.payment_intent_id == order.payment_intent_id]
        for c, decision in payments.decide_match_unmatched(order, parked, NOW, timedelta(hours=24)):
            if decision.order is not None:
                self._store_confirmation(c, decision.order)
                self.orders[order.order_id].order = decision.order
            self.unmatched.remove(c)
            self.closed.add((c.transaction_id, c.type))
            self._apply(decision, c.gateway_event_id)

    def _store_confirmation(self, c: payments.Confirmation, order: payments.Order) -> None:
        self.confirmations.setdefault((c.transaction_id, c.type), (order.order_id, order.attempt))

    def on_retry_requested(self, msg: Msg) -> None:
        p = msg.payload
        row = self.orders.get(p["order_id"])
        decision = payments.decide_retry(
            row.order if row else None,
            p["payment_intent_id"],
            p["payment_method"],
            row.saga_status if row else None,
        )
        if decision.outcome == "held" and row is not None:
            row.pending_retry = {**p, "event_id": msg.event_id}
            return
        self._settle_retry(decision, None)

    def _settle_retry(self, decision: payments.Decision, causation: str | None) -> None:
        if decision.order is not None:
            row = self.orders[decision.order.order_id]
            row.order, row.pending_retry, row.saga_status = decision.order, None, None
        self._apply(decision, causation)
        if decision.order is not None:
            self._match_parked(decision.order)

    def on_status_changed(self, msg: Msg) -> None:
        s = msg.payload
        row = self.orders.get(s["order_id"])
        if row is None or s["version"] <= row.saga_version:
            return
        row.saga_version = s["version"]
        if s["payment_intent_id"] != row.order.payment_intent_id:
            return
        row.saga_status = s["status"]
        if s["status"] == "PAYMENT_FAILED" and row.order.status in ("accepted", "flagged"):
            row.order = replace(row.order, status="failed")
        pending = row.pending_retry
        if pending is None:
            return
        decision = payments.decide_retry(
            row.order, pending["payment_intent_id"], pending["payment_method"], row.saga_status
        )
        if decision.outcome == "held":
            return
        row.pending_retry = None
        self._settle_retry(decision, pending["event_id"])

    def on_confirmation(self, msg: Msg) -> None:
        c: payments.Confirmation = msg.payload["confirmation"]
        first = c.gateway_event_id not in self.seen
        self.seen.add(c.gateway_event_id)
        known = (c.transaction_id, c.type) in self.confirmations.keys() | self.closed or any(
            (u.transaction_id, u.type) == (c.transaction_id, c.type) for u in self.unmatched
        )
        if not first or known:
            return
        row = self.orders.get(c.order_id) if c.order_id else None
        if row is None and not c.order_id:
            row = next(
                (
                    r
                    for r in self.orders.values()
                    if r.order.payment_intent_id == c.payment_intent_id
                ),
                None,
            )
        order = row.order if row else None
        confirmed = True
        if order is not None and order.status == "flagged":
            confirmed = any(
                v == (order.order_id, order.attempt) for v in self.confirmations.values()
            )
        decision = payments.decide_confirmation(order, c, attempt_confirmed=confirmed)
        if decision.outcome == "parked":
            self.unmatched.append(c)
        elif decision.order is not None and row is not None:
            self._store_confirmation(c, decision.order)
            row.order = decision.order
        self._apply(decision, c.gateway_event_id)


@dataclass
class Reservation:
    state: inventory.ReservationState
    lines: tuple[inventory.Line, ...]


class Inventory(Service):
    group = "inventory"

    def __init__(self, saga: Saga) -> None:
        super().__init__(saga)
        self.stock: dict[str, inventory.StockLevel] = {}
        self.reservations: dict[tuple[str, int], Reservation] = {}

    def handle(self, msg: Msg) -> None:
        if msg.topic == CATALOG_TOPIC:
            self.on_stock_level_set(msg)
        elif msg.event_type == "PaymentAccepted":
            self.on_payment_accepted(msg)
        elif msg.event_type in ("PaymentCaptured", "SaleConfirmed"):
            self._settle(msg, "commit", None)
        elif msg.event_type == "CaptureDeclined":
            self._settle(msg, "release", "capture_declined")
        else:
            self._settle(msg, "release", "authorization_expired")

    def on_stock_level_set(self, msg: Msg) -> None:
        sku, available = msg.payload["sku"], msg.payload["available"]
        current = self.stock.get(sku)
        rejection = inventory.stock_level_rejection(current, available)
        if rejection is not None:
            self.dead_letter(msg, "stock_below_committed")
            return
        self.stock[sku] = (
            replace(current, available=available)
            if current
            else (inventory.StockLevel(sku, available, 0, 0))
        )

    def _move(self, lines: tuple[inventory.Line, ...], target: str) -> None:
        for line in lines:
            s = self.stock[line.sku]
            sold = s.sold + line.quantity if target == "committed" else s.sold
            self.stock[line.sku] = replace(s, reserved=s.reserved - line.quantity, sold=sold)

    def on_payment_accepted(self, msg: Msg) -> None:
        p = msg.payload
        order_id, attempt = p["order_id"], p["attempt"]
        lines = inventory.merge_lines((i["sku"], i["quantity"]) for i in p["items"])
        held = {n: r.state for (o, n), r in self.reservations.items() if o == order_id}
        for n in inventory.superseded_attempts(attempt, held.items()):
            r = self.reservations[(order_id, n)]
            self._move(r.lines, "released")
            r.state = "released"
        if (order_id, attempt) in self.reservations:
            return
        # store.hold_claimed: every line a conditional UPDATE; all or none
        short = [
            ln.sku
            for ln in lines
            if ln.sku not in self.stock or self.stock[ln.sku].sellable < ln.quantity
        ]
        if short:
            self.reservations[(order_id, attempt)] = Reservation("failed", lines)
            self.emit(INVENTORY_TOPIC, "StockReservationFailed",
                      {**_context(p), "short_skus": short}, cause=msg)  # fmt: skip
            return
        for ln in lines:
            s = self.stock[ln.sku]
            self.stock[ln.sku] = replace(s, reserved=s.reserved + ln.quantity)
        self.reservations[(order_id, attempt)] = Reservation("reserved", lines)
        items = [{"sku": ln.sku, "quantity": ln.quantity} for ln in lines]
        self.emit(INVENTORY_TOPIC, "StockReserved", {**_context(msg.payload), "items": items},
                  cause=msg)  # fmt: skip

    def _settle(self, msg: Msg, settlement: inventory.Settlement, reason: str | None) -> None:
        p = msg.payload
        r = self.reservations.get((p["order_id"], p["attempt"]))
        decision = inventory.decide_settlement(r.state if r else None, settlement)
        if decision == "duplicate":
            return
        if decision == "reject" or r is None:
            self.dead_letter(msg, "reservation_not_held")
            return
        target = "committed" if settlement == "commit" else "released"
        self._move(r.lines, target)
        r.state = target
        items = [{"sku": ln.sku, "quantity": ln.quantity} for ln in r.lines]
        if reason is None:
            self.emit(INVENTORY_TOPIC, "StockCommitted", {**_context(p), "items": items}, cause=msg)
        else:
            payload = {**_context(p), "items": items, "reason": reason}
            self.emit(INVENTORY_TOPIC, "StockReleased", payload, cause=msg)


@dataclass
class IntentRow:
    """An intent table row (capture or compensation), as ``IntentStore`` keeps it."""

    state: str
    context: dict[str, Any]
    cause: Msg
    attempts: int = 0
    alerted: bool = False
    reason: str | None = None  # refunds: the trigger
    action: str | None = None  # refunds: void | refund
    outcome: str | None = None  # capture_id / refund id / failure reason


class Worker(Service):
    intents: dict[Any, IntentRow]

    def due(self) -> list[Any]:
        """Rows a worker may claim: pending/unknown, or in_flight after a crash (the
        model's lease has always run out by the next round)."""
        return [k for k, row in self.intents.items() if row.state in ("pending", "unknown",
                                                                       "in_flight")]  # fmt: skip

    def emit_caused(self, row: IntentRow, event_type: str, extra: dict[str, Any]) -> None:
        self.emit(self.topic, event_type, {**row.context, **extra}, cause=row.cause)

    topic: str

    def round(self, key: Any, crash: bool) -> None:
        row = self.intents[key]
        prior = row.state
        row.state = "in_flight"
        row.attempts += 1
        resolution = self.decide(key, row, prior)
        if crash:
            return  # died after the call, before transaction B: reclaimed later
        self.resolve(key, row, resolution)

    def decide(self, key: Any, row: IntentRow, prior: str) -> Any:
        raise NotImplementedError

    def resolve(self, key: Any, row: IntentRow, resolution: Any) -> None:
        raise NotImplementedError


class Capture(Worker):
    group = "capture"
    topic = CAPTURE_TOPIC

    def __init__(self, saga: Saga) -> None:
        super().__init__(saga)
        self.intents: dict[str, IntentRow] = {}

    def handle(self, msg: Msg) -> None:
        ctx = _context(msg.payload)
        txn = ctx["transaction_id"]
        intent = capture.decide_stock_reserved(ctx["flow"], txn, NOW, NOW)
        if txn in self.intents:
            return
        self.intents[txn] = IntentRow(intent.state, ctx, msg)
        if intent.state == "sale_confirmed":
            self.emit(CAPTURE_TOPIC, "SaleConfirmed", ctx, cause=msg)

    def _claim(self, txn: str, row: IntentRow, prior: str) -> capture.Claim:
        return capture.Claim(txn, row.context["amount"], row.context["currency"], prior,  # type: ignore[arg-type]
                             row.attempts, NOW, row.alerted)  # fmt: skip

    def decide(self, txn: Any, row: IntentRow, prior: str) -> capture.Resolution:
        claim = self._claim(txn, row, prior)
        gw = self.saga.gateway
        first = capture.first_step(claim, self.saga.now, CAPTURE_POLICY)
        if isinstance(first, capture.Lookup):
            payment = gw.get_payment(txn)
            if payment is None:
                return capture.not_found()
            step = capture.after_lookup(claim, payment)
        else:
            step = first
        if not isinstance(step, capture.Call):
            return step
        try:
            outcome = gw.operate("capture", txn, capture.capture_key(txn),
                                 claim.amount, claim.currency)  # fmt: skip
        except Conflict:
            return capture.retry_later(claim, "http_409", self.saga.now, CAPTURE_POLICY, 0.5)
        return capture.after_capture(claim, outcome, self.saga.now, CAPTURE_POLICY, 0.5)

    def resolve(self, txn: Any, row: IntentRow, resolution: Any) -> None:
        match resolution:
            case capture.Captured(capture_id=capture_id):
                row.state, row.outcome = "captured", capture_id
                self.emit_caused(row, "PaymentCaptured", {"capture_id": capture_id})
            case capture.CaptureDeclined(decline_code=code):
                row.state, row.outcome = "declined", code
                self.emit_caused(row, "CaptureDeclined", {"decline_code": code})
            case capture.Expired():
                row.state = "expired"
                self.emit_caused(row, "AuthorizationExpired", {})
            case capture.Failed(reason=reason):
                alerted = row.alerted
                row.state, row.outcome = "failed", reason
                if not alerted:
                    self.emit_caused(row, "CaptureFailed", {"reason": reason})
            case capture.Stalled():
                row.state, row.alerted = "unknown", True
                self.emit_caused(row, "CaptureFailed", {"reason": "retry_budget_exhausted"})
            case capture.Retry():
                row.state = "unknown"


_TRIGGERS: dict[str, refunds.Trigger] = {
    "StockReservationFailed": "out_of_stock",
    "CaptureDeclined": "capture_declined",
    "AuthorizationExpired": "authorization_expired",
}


class Refunds(Worker):
    group = "refunds"
    topic = REFUNDS_TOPIC

    def __init__(self, saga: Saga) -> None:
        super().__init__(saga)
        self.intents: dict[tuple[str, str], IntentRow] = {}

    def handle(self, msg: Msg) -> None:
        ctx = _context(msg.payload)
        trigger = _TRIGGERS[msg.event_type]
        intent = refunds.decide_compensation(ctx["flow"], trigger, ctx["transaction_id"])
        if intent is None:
            self.dead_letter(msg, "no_compensation")
            return
        key = (ctx["transaction_id"], intent.action)
        if key in self.intents:
            return
        self.intents[key] = IntentRow("pending", ctx, msg, reason=trigger, action=intent.action)

    def decide(self, key: Any, row: IntentRow, prior: str) -> refunds.Resolution:
        txn, action = key
        claim = refunds.Claim(txn, action, row.context["amount"], row.context["currency"],
                              row.reason, prior, row.attempts, row.alerted)  # type: ignore[arg-type]  # fmt: skip
        gw = self.saga.gateway
        first = refunds.first_step(claim)
        if isinstance(first, refunds.Lookup):
            payment = gw.get_payment(txn)
            if payment is None:
                return refunds.Failed("not_found")
            step = refunds.after_lookup(claim, payment)
        else:
            step = first
        if not isinstance(step, refunds.Call):
            return step
        idem = refunds.compensation_key(action, txn)
        try:
            if action == "void":
                outcome = gw.operate("void", txn, idem)
            else:
                outcome = gw.operate("refund", txn, idem, claim.amount, claim.currency)
        except Conflict:
            return refunds.retry_later(claim, "http_409", self.saga.now, RETRY, 0.5)
        return refunds.after_call(claim, outcome, self.saga.now, RETRY, 0.5)

    def resolve(self, key: Any, row: IntentRow, resolution: Any) -> None:
        match resolution:
            case refunds.Succeeded(refund_id=refund_id):
                row.state, row.outcome = "succeeded", refund_id
                if row.action == "refund":
                    self.emit_caused(row, "RefundSucceeded",
                                     {"refund_id": refund_id, "reason": row.reason})  # fmt: skip
                else:
                    self.emit_caused(row, "AuthorizationVoided", {"reason": row.reason})
            case refunds.Failed(reason=reason):
                alerted = row.alerted
                row.state, row.outcome = "failed", reason
                if not alerted:  # the alarm of a stalled round was the failure event
                    self.emit_caused(row, "CompensationFailed",
                                     {"action": row.action, "reason": reason})  # fmt: skip
            case refunds.Stalled():
                row.state, row.alerted = "unknown", True
                alarm = {"action": row.action, "reason": "retry_budget_exhausted"}
                self.emit_caused(row, "CompensationFailed", alarm)
            case refunds.Retry():
                row.state = "unknown"


@dataclass(frozen=True)
class Emitted:
    """A status change or notification as published, with the attempt it was for."""

    attempt: int
    change: orders.StatusChange
    notification: orders.Notification | None


class Orders(Service):
    group = "orders"

    def __init__(self, saga: Saga) -> None:
        super().__init__(saga)
        self.views: dict[str, orders.OrderView] = {}
        self.applied: dict[str, set[str]] = defaultdict(set)
        self.held: dict[str, list[Msg]] = defaultdict(list)
        self.emitted: dict[str, list[Emitted]] = defaultdict(list)

    def handle(self, msg: Msg) -> None:
        order_id = msg.payload["order_id"]
        applied = self.applied[order_id]
        if not orders.is_ready(msg.saga_seq, msg.causation_id, applied):
            self.held[order_id].append(msg)
            return
        self._apply(msg)
        held = self.held[order_id]
        by_id = {h.event_id: h for h in held}
        for event_id in orders.release_order(
            [(h.saga_seq or 0, h.event_id, h.causation_id) for h in held], applied
        ):
            self._apply(by_id[event_id])
        self.held[order_id] = [h for h in held if h.event_id not in applied]

    def _apply(self, msg: Msg) -> None:
        order_id = msg.payload["order_id"]
        outcome = orders.decide(self.views.get(order_id), msg.event_type, msg.payload)
        self.applied[order_id].add(msg.event_id)
        if outcome.change is None or outcome.view is None:
            return
        self.saga.check_paid(outcome.view, outcome.change)
        self.views[order_id] = outcome.view
        self.emitted[order_id].append(
            Emitted(outcome.view.attempt, outcome.change, outcome.notification)
        )
        self.emit(STATUS_TOPIC, "OrderStatusChanged", dataclasses.asdict(outcome.change),
                  cause=msg)  # fmt: skip


# --- the composition ----------------------------------------------------------------


class Saga:
    """Every service, the bus, the gateway and the customers of one scenario."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.ids = itertools.count(1)
        self.now = NOW
        self.bus = Bus()
        self.gateway = FakeGateway()
        self.dead_letters: list[tuple[str, Msg, str]] = []
        self.violations: list[str] = []
        self.payments = Payments(self)
        self.inventory = Inventory(self)
        self.capture = Capture(self)
        self.refunds = Refunds(self)
        self.orders = Orders(self)
        self.services: dict[str, Service] = {
            s.group: s
            for s in (self.payments, self.inventory, self.capture, self.refunds, self.orders)
        }
        self.specs = {o.order_id: o for o in scenario.orders}
        self.attempts_paid: dict[str, int] = {}  # order -> attempts the customer has paid
        self.webhooks: list[Msg] = []

    # ------------------------------------------------------------ inputs

    def set_stock(self, sku: str, available: int) -> None:
        payload = {"sku": sku, "available": available}
        self.bus.publish(Msg(CATALOG_TOPIC, sku, f"stock-{next(self.ids)}", "StockLevelSet",
                             payload))  # fmt: skip

    def place_order(self, spec: OrderSpec) -> None:
        payload = {
            "order_id": spec.order_id,
            "customer_id": f"cust_{spec.order_id}",
            "currency": CURRENCY,
            "items": [
                {"sku": sku, "quantity": q, "unit_amount": spec.unit_amount}
                for sku, q in spec.items
            ],
            "total_amount": spec.total,
            "payment_intent_id": intent_of(spec.order_id, 1),
            "payment_method": "card",
        }
        self.bus.publish(Msg(CHECKOUT_ORDERS_TOPIC, spec.order_id, f"placed-{spec.order_id}",
                             "OrderPlaced", payload))  # fmt: skip
        self._pay(spec, 1)

    def _pay(self, spec: OrderSpec, attempt: int) -> None:
        """The customer pays at the gateway, which confirms by webhook."""
        a = spec.attempts[attempt - 1]
        txn, intent = txn_of(spec.order_id, attempt), intent_of(spec.order_id, attempt)
        self.gateway.create(txn, spec.order_id, intent, spec.total, a.kind)
        for op, script in (("capture", a.capture), ("void", a.void), ("refund", a.refund)):
            self.gateway.scripts[(txn, op)] = list(script)
        self.attempts_paid[spec.order_id] = attempt
        kind = {"authorize": "payment.authorized", "sale": "payment.captured"}.get(
            a.kind, "payment.failed"
        )
        c = payments.Confirmation(
            gateway=GATEWAY,
            gateway_event_id=f"evt_{txn}",
            type=kind,  # type: ignore[arg-type]
            transaction_id=txn,
            payment_intent_id=intent,
            order_id=spec.order_id,
            amount=spec.total,
            currency=CURRENCY,
            payment_method_type="card",
            brand="visa",
            last4="4242",
            failure_code="card_declined" if a.kind == "decline" else None,
            failure_message="declined" if a.kind == "decline" else None,
            record_time=NOW,
        )
        self.webhook(c)

    def webhook(self, c: payments.Confirmation, delivery: str | None = None) -> None:
        """One bridge append of a webhook: a new delivery unless ``delivery`` names one."""
        msg = Msg(CONFIRMATIONS_TOPIC, c.order_id or c.payment_intent_id,
                  delivery or f"webhook-{next(self.ids)}", c.type, {"confirmation": c})  # fmt: skip
        self.webhooks.append(msg)
        self.bus.publish(msg)

    def retry_due(self) -> list[str]:
        """Orders whose customer sees its latest payment PAYMENT_FAILED and has another
        attempt planned."""
        due = []
        for order_id, spec in self.specs.items():
            view = self.orders.views.get(order_id)
            paid = self.attempts_paid.get(order_id, 0)
            if (
                view is not None
                and view.status == "PAYMENT_FAILED"
                and view.payment_intent_id == intent_of(order_id, paid)
                and paid < len(spec.attempts)
            ):
                due.append(order_id)
        return due

    def retry_possible(self) -> list[str]:
        """Orders whose customer could retry now, whatever the status shows."""
        return [
            o for o, s in self.specs.items() if 0 < self.attempts_paid.get(o, 0) < len(s.attempts)
        ]

    def customer_retries(self, order_id: str) -> None:
        spec = self.specs[order_id]
        attempt = self.attempts_paid[order_id] + 1
        payload = {
            "order_id": order_id,
            "payment_intent_id": intent_of(order_id, attempt),
            "payment_method": "wallet",
        }
        self.bus.publish(Msg(CHECKOUT_ORDERS_TOPIC, order_id, f"retry-{order_id}-{attempt}",
                             "PaymentRetryRequested", payload))  # fmt: skip
        self._pay(spec, attempt)

    # ------------------------------------------------------------ steps

    def deliver(self, group: str, topic: str, key: str) -> None:
        self.services[group].deliver(self.bus.take(group, topic, key))

    def rounds_due(self) -> list[tuple[str, Any]]:
        return [("capture", k) for k in self.capture.due()] + [
            ("refunds", k) for k in self.refunds.due()
        ]

    def run_round(self, worker: str, key: Any, crash: bool = False) -> None:
        service = self.capture if worker == "capture" else self.refunds
        service.round(key, crash)

    def quiescent(self) -> bool:
        return not (self.bus.pending() or self.rounds_due() or self.retry_due())

    def drain(self, rng: random.Random | None = None, limit: int = 20_000) -> None:
        """Run every step until nothing is left: in FIFO order, or as ``rng`` picks."""
        for _ in range(limit):
            steps: list[tuple[str, Any]] = [("deliver", p) for p in self.bus.pending()]
            steps += [("round", r) for r in self.rounds_due()]
            steps += [("retry", o) for o in self.retry_due()]
            if not steps:
                return
            kind, arg = rng.choice(steps) if rng else steps[0]
            if kind == "deliver":
                self.deliver(*arg)
            elif kind == "round":
                self.run_round(*arg)
            else:
                self.customer_retries(arg)
        raise AssertionError(f"no quiescence after {limit} steps")

    # ------------------------------------------------------------ checks

    def check_paid(self, view: orders.OrderView, change: orders.StatusChange) -> None:
        """At the moment PAID_CONFIRMED is decided: capture (or sale) stored, items held."""
        if change.status != "PAID_CONFIRMED":
            return
        row = self.capture.intents.get(change.transaction_id or "")
        r = self.inventory.reservations.get((view.order_id, view.attempt))
        if row is None or row.state not in ("captured", "sale_confirmed"):
            self.violations.append(f"{view.order_id} PAID_CONFIRMED without a stored capture")
        if r is None or r.state not in ("reserved", "committed"):
            self.violations.append(f"{view.order_id} PAID_CONFIRMED without reserved items")

    def safety_violations(self) -> list[str]:
        """The rules that must hold at every moment (docs/contract.md §3.1, §3.3)."""
        found = list(self.violations)
        for sku, s in self.inventory.stock.items():
            if s.reserved < 0 or s.sold < 0 or s.reserved + s.sold > s.available:
                found.append(f"{sku}: oversold {s}")
        for txn, t in self.gateway.txns.items():
            for what, done in (("captured", t.captures), ("refunded", t.refunds),
                               ("voided", t.voids)):  # fmt: skip
                if len(done) > 1:
                    found.append(f"{txn} {what} {len(done)} times")
        for group, msg, reason in self.dead_letters:
            if msg.topic != CATALOG_TOPIC:
                found.append(f"{group} dead-lettered {msg.event_type} of {msg.key}: {reason}")
        for order_id, emitted in self.orders.emitted.items():
            found += history_violations(order_id, emitted)
        return found

    def final_violations(self) -> list[str]:
        """At quiescence: every order settled or explainably pending, money where its
        status says, no stock left held, one notification per outcome."""
        found = self.safety_violations()
        for order_id, spec in self.specs.items():
            view = self.orders.views.get(order_id)
            if view is None:
                found.append(f"{order_id} never registered")
                continue
            if view.status not in FINAL | {"NEEDS_RECONCILIATION"}:
                found.append(f"{order_id} left {view.status}")
            row = self.payments.orders[order_id]
            if row.order.attempt != view.attempt:
                found.append(
                    f"{order_id}: payments is at attempt {row.order.attempt}, "
                    f"orders at {view.attempt} ({view.status})"
                )
            found += self._money_violations(spec, view)
            found += _notification_violations(order_id, self.orders.emitted[order_id])
        return found

    def _money_violations(self, spec: OrderSpec, view: orders.OrderView) -> list[str]:
        """Each payment the customer made, by the attempt payments stored it for."""
        found = []
        for n in range(1, self.attempts_paid.get(spec.order_id, 0) + 1):
            txn = txn_of(spec.order_id, n)
            t = self.gateway.txns[txn]
            stored = [v for (x, _), v in self.payments.confirmations.items() if x == txn]
            if not stored:
                # parked as unmatched, or rejected (a payment of a paid order): an
                # operator's case, named by `paysaga unmatched` / `paysaga reconcile`
                continue
            attempt = stored[0][1]
            status = view.status if attempt == view.attempt else "SUPERSEDED"
            held = bool(t.captures) and not t.refunds
            r = self.inventory.reservations.get((spec.order_id, attempt))
            name = f"{spec.order_id}#{attempt} ({status}, {txn})"
            compensation_failed = any(
                k[0] == txn and row.state == "failed" for k, row in self.refunds.intents.items()
            )
            if status == "PAID_CONFIRMED":
                if not held or t.state != "captured":
                    found.append(f"{name}: paid but the gateway holds {t.state}")
                if r is None or r.state != "committed":
                    found.append(f"{name}: paid but reservation {r and r.state}")
            elif status != "NEEDS_RECONCILIATION" and not compensation_failed:
                # failed, refunded or an earlier attempt: no money kept, no stock held
                # (unless a void/refund failed for good: reconcile lists it for an operator)
                if held:
                    found.append(f"{name}: the gateway keeps captured money")
                if t.state == "authorized":
                    found.append(f"{name}: authorization left open")
                if r is not None and r.state == "reserved":
                    found.append(f"{name}: stock still reserved")
        return found

    def final_statuses(self) -> dict[str, tuple[str, str | None, int]]:
        return {o: (v.status, v.reason, v.attempt) for o, v in self.orders.views.items()}


#: Finding (property tests, not fixed yet): payments accepts a customer's retry while it
#: still mirrors PAYMENT_FAILED, but orders has meanwhile applied the failed attempt's
#: CompensationFailed (NEEDS_RECONCILIATION) and then ignores PaymentRetryAccepted
#: (transition_not_allowed) and every event of the new attempt (unknown_attempt): the new
#: attempt's money is captured and its items sold while the order stays
#: NEEDS_RECONCILIATION naming the old transaction, with no payment_confirmed notice.
#: See tests/unit/test_properties_saga.py::test_a_retry_accepted_by_payments_is_not_lost.


FINAL = frozenset({"PAID_CONFIRMED", "PAYMENT_FAILED", "REFUNDED"})

#: The moves a status may make within one payment attempt, from the meanings of
#: docs/contract.md §3.1 (written out here, independently of services/orders/domain.py):
#: forward along the happy path, to PAYMENT_FAILED while nothing is charged, to
#: REFUND_PENDING when a charged sale cannot be fulfilled, to NEEDS_RECONCILIATION from
#: anything not final-and-settled; PAID_CONFIRMED and REFUNDED are never left.
ALLOWED: dict[str, frozenset[str]] = {
    "PENDING_PAYMENT": frozenset({"PAYMENT_AUTHORIZED", "PAYMENT_FAILED", "NEEDS_RECONCILIATION"}),
    "PAYMENT_AUTHORIZED": frozenset(
        {"INVENTORY_RESERVED", "PAYMENT_FAILED", "REFUND_PENDING", "NEEDS_RECONCILIATION"}
    ),
    "INVENTORY_RESERVED": frozenset({"PAID_CONFIRMED", "PAYMENT_FAILED", "NEEDS_RECONCILIATION"}),
    "PAYMENT_FAILED": frozenset({"NEEDS_RECONCILIATION"}),
    "REFUND_PENDING": frozenset({"REFUNDED", "NEEDS_RECONCILIATION"}),
    # a late outcome (a janitor's finding) may still settle it
    "NEEDS_RECONCILIATION": frozenset({"PAID_CONFIRMED", "PAYMENT_FAILED", "REFUNDED"}),
    "PAID_CONFIRMED": frozenset(),
    "REFUNDED": frozenset(),
}

NOTIFIES = {"PAID_CONFIRMED": "payment_confirmed", "REFUNDED": "refunded"}


def history_violations(order_id: str, emitted: list[Emitted]) -> list[str]:
    found = []
    previous: Emitted | None = None
    failed: set[int] = set()  # attempts that reached PAYMENT_FAILED
    for e in emitted:
        c = e.change
        expected = 1 if previous is None else previous.change.version + 1
        if c.version != expected:
            found.append(f"{order_id}: version {c.version} after {expected - 1}")
        before = previous.change.status if previous else None
        if c.previous_status != before:
            found.append(f"{order_id}: previous_status {c.previous_status}, was {before}")
        if previous is None:
            if c.status != "PENDING_PAYMENT":
                found.append(f"{order_id}: starts at {c.status}")
        elif e.attempt == previous.attempt + 1:
            # a new attempt opens from PAYMENT_FAILED, or from a flag raised after the
            # attempt had failed (its void failed): payments accepted the retry on the
            # published PAYMENT_FAILED
            opens_from = before == "PAYMENT_FAILED" or (
                before == "NEEDS_RECONCILIATION" and previous.attempt in failed
            )
            if not opens_from or (c.status, c.reason) != ("PENDING_PAYMENT", "payment_retry"):
                found.append(f"{order_id}: attempt {e.attempt} opened from {before}")
        elif e.attempt != previous.attempt:
            found.append(f"{order_id}: attempt {previous.attempt} -> {e.attempt}")
        elif before is not None and c.status not in ALLOWED[before]:
            found.append(f"{order_id}#{e.attempt}: {before} -> {c.status} not allowed")
        if c.status == "PAYMENT_FAILED":
            failed.add(e.attempt)
        previous = e
    seen: set[tuple[int, str]] = set()
    for e in emitted:
        if e.notification is None:
            continue
        key = (e.attempt, e.notification.kind)
        if key in seen:
            found.append(f"{order_id}#{e.attempt}: second {e.notification.kind} notification")
        seen.add(key)
        if e.notification.status != e.change.status:
            found.append(f"{order_id}: {e.notification.kind} sent with {e.change.status}")
    return found


def _kind(change: orders.StatusChange) -> str | None:
    if change.status == "PAYMENT_FAILED":
        return "out_of_stock" if change.reason == "out_of_stock" else "payment_failed"
    return NOTIFIES.get(change.status)


def _notification_violations(order_id: str, emitted: list[Emitted]) -> list[str]:
    """Exactly one notification per outcome (attempt, kind) the order reached."""
    outcomes = {(e.attempt, k) for e in emitted if (k := _kind(e.change)) is not None}
    sent = [(e.attempt, e.notification.kind) for e in emitted if e.notification is not None]
    found = []
    for outcome in sorted(outcomes):
        if sent.count(outcome) != 1:
            found.append(f"{order_id}#{outcome[0]}: {sent.count(outcome)} {outcome[1]} notices")
    found += [f"{order_id}: notice {s} for no outcome" for s in sent if s not in outcomes]
    return found
