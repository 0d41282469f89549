"""Property tests of each service's pure domain (services/*/domain.py), driven the way
its handlers and workers drive it (tests/support/saga_model.py mirrors those)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.orders import domain as orders
from services.payments import domain as payments
from services.runtime.topics import CAPTURE_TOPIC, CATALOG_TOPIC, PAYMENTS_TOPIC
from tests.support.saga_model import (
    CAPTURE_POLICY,
    NOW,
    Emitted,
    IntentRow,
    Msg,
    Saga,
    Scenario,
    examples,
    history_violations,
)

SETTINGS = settings(max_examples=examples(60), stateful_step_count=40, deadline=None)
behaviour = st.sampled_from(["ok", "declined", "unavailable", "lost"])


# --- inventory: never oversell, settle once -----------------------------------------


class InventoryMachine(RuleBasedStateMachine):
    """Stock levels, reservations of several orders' attempts and their settlements,
    in any order and repeated: reserved + sold never exceed the stock set, a
    reservation is all lines or none, and settles once."""

    @initialize()
    def begin(self) -> None:
        self.saga = Saga(Scenario((), ()))
        self.inv = self.saga.inventory
        self.settled: dict[tuple[str, int], int] = {}

    def _msg(self, topic: str, event_type: str, payload: dict[str, Any], key: str) -> Msg:
        return Msg(topic, key, f"e{next(self.saga.ids)}", event_type, payload, 1)

    @rule(sku=st.sampled_from("ab"), available=st.integers(0, 5))
    def set_level(self, sku: str, available: int) -> None:
        before = self.inv.stock.get(sku)
        self.inv.deliver(self._msg(CATALOG_TOPIC, "StockLevelSet",
                                   {"sku": sku, "available": available}, sku))  # fmt: skip
        if before is not None and before.reserved + before.sold > available:
            assert self.inv.stock[sku] == before  # refused, to the dead letters

    @rule(
        order=st.sampled_from(["o1", "o2", "o3"]),
        attempt=st.integers(1, 3),
        lines=st.lists(st.tuples(st.sampled_from("ab"), st.integers(1, 3)), min_size=1),
    )
    def payment_accepted(self, order: str, attempt: int, lines: list[tuple[str, int]]) -> None:
        before = {s: (v.reserved, v.sold) for s, v in self.inv.stock.items()}
        payload = {
            "order_id": order, "attempt": attempt, "payment_intent_id": f"pi_{attempt}",
            "transaction_id": f"t_{order}_{attempt}", "flow": "authorization", "amount": 1,
            "currency": "EUR", "gateway": "g",
            "items": [{"sku": s, "quantity": q} for s, q in lines],
        }  # fmt: skip
        known = (order, attempt) in self.inv.reservations
        self.inv.deliver(self._msg(PAYMENTS_TOPIC, "PaymentAccepted", payload, order))
        r = self.inv.reservations[(order, attempt)]
        if not known and r.state == "reserved":
            for line in r.lines:  # every line held, each by its whole quantity
                assert self.inv.stock[line.sku].reserved >= line.quantity
        if not known and r.state == "failed":
            # nothing of this attempt was taken (only superseded attempts released)
            for sku, (reserved, _) in before.items():
                assert self.inv.stock[sku].reserved <= reserved

    @rule(
        pick=st.integers(0, 100),
        event_type=st.sampled_from(["PaymentCaptured", "SaleConfirmed", "CaptureDeclined"]),
    )
    def settle(self, pick: int, event_type: str) -> None:
        """A settlement of a known attempt (or of none: the 'no reservation' case)."""
        keys = [*sorted(self.inv.reservations), ("o9", 1)]
        order, attempt = keys[pick % len(keys)]
        r = self.inv.reservations.get((order, attempt))
        state = r.state if r else None
        payload = {"order_id": order, "attempt": attempt, "payment_intent_id": "p",
                   "transaction_id": "t", "flow": "authorization", "amount": 1,
                   "currency": "EUR", "gateway": "g", "capture_id": "c",
                   "decline_code": "x"}  # fmt: skip
        self.inv.deliver(self._msg(CAPTURE_TOPIC, event_type, payload, order))
        after = r.state if r else None
        if state == "reserved":
            self.settled[(order, attempt)] = self.settled.get((order, attempt), 0) + 1
        elif state != after:
            raise AssertionError(f"{order}#{attempt} settled again: {state} -> {after}")

    @invariant()
    def never_oversold(self) -> None:
        for s in self.inv.stock.values():
            assert s.reserved >= 0
            assert s.sold >= 0
            assert s.reserved + s.sold <= s.available, s
        held = {
            sku: sum(ln.quantity for r in self.inv.reservations.values()
                     if r.state == "reserved" for ln in r.lines if ln.sku == sku)
            for sku in self.inv.stock
        }  # fmt: skip
        assert held == {sku: s.reserved for sku, s in self.inv.stock.items()}
        assert all(n == 1 for n in self.settled.values())


InventoryMachine.TestCase.settings = SETTINGS
test_inventory_never_oversells = InventoryMachine.TestCase


# --- orders: the projection ---------------------------------------------------------

SAGA_TYPES = [
    "PaymentRetryAccepted", "PaymentAccepted", "PaymentDeclined", "StockReserved",
    "StockReservationFailed", "PaymentCaptured", "SaleConfirmed", "CaptureDeclined",
    "AuthorizationVoided", "RefundSucceeded", "CaptureFailed", "CompensationFailed",
    "OrderFlaggedForReconciliation", "StockReleased",
]  # fmt: skip


def _payload(event_type: str, attempt: int, flow: str, reason: str) -> dict[str, Any]:
    return {
        "order_id": "o", "attempt": attempt, "customer_id": "c", "amount": 100,
        "currency": "EUR", "payment_intent_id": f"pi_{attempt}",
        "transaction_id": f"t_{attempt}", "flow": flow, "gateway": "g",
        "failure_code": "card_declined", "reason": reason, "action": "void",
        "payment_method": "card",
    }  # fmt: skip


class OrdersMachine(RuleBasedStateMachine):
    """Any saga events of any attempts, in any order and repeated, applied by
    ``orders.decide``: version +1 per change, allowed moves only, a new attempt only
    from PAYMENT_FAILED, PAID_CONFIRMED and REFUNDED never left, one notification per
    (attempt, kind)."""

    @initialize()
    def begin(self) -> None:
        created = orders.decide(None, "OrderRegistered", _payload("OrderRegistered", 1, "sale", ""))
        assert created.view is not None
        assert created.change is not None
        self.view: orders.OrderView = created.view
        self.emitted = [Emitted(1, created.change, None)]

    @rule(
        event_type=st.sampled_from(SAGA_TYPES),
        attempt=st.integers(1, 3),
        flow=st.sampled_from(["sale", "authorization"]),
        reason=st.sampled_from(
            ["out_of_stock", "capture_declined", "authorization_expired", "record_dead_lettered"]
        ),
    )
    def apply(self, event_type: str, attempt: int, flow: str, reason: str) -> None:
        before = self.view
        if event_type == "PaymentRetryAccepted" and attempt > before.attempt + 1:
            return  # payments numbers attempts one by one
        out = orders.decide(before, event_type, _payload(event_type, attempt, flow, reason))
        assert out.view is not None
        if out.change is None:
            assert out.view == before
            assert out.notification is None
            return
        self.view = out.view
        self.emitted.append(Emitted(out.view.attempt, out.change, out.notification))
        assert before.status not in ("PAID_CONFIRMED", "REFUNDED")

    @invariant()
    def history_is_valid(self) -> None:
        assert history_violations("o", self.emitted) == []


OrdersMachine.TestCase.settings = SETTINGS
test_orders_projection_moves_only_forward = OrdersMachine.TestCase


@given(
    causes=st.lists(st.integers(0, 8), min_size=1, max_size=8),
    applied=st.sets(st.integers(0, 8), max_size=3),
)
@SETTINGS
def test_the_causal_gate_releases_each_event_once_after_its_cause(
    causes: list[int], applied: set[int]
) -> None:
    """Held event i (saga_seq 2) names cause ``causes[i]``: released are exactly those
    whose chain of causes reaches an applied event, each once, each after its cause."""
    held = [(2, f"e{i}", f"e{c}") for i, c in enumerate(causes)]
    done = {f"e{i}" for i in applied}
    released = orders.release_order(held, done)
    assert len(released) == len(set(released))
    seen = set(done)
    for event_id in released:
        cause = next(c for _, e, c in held if e == event_id)
        assert cause in seen
        seen.add(event_id)
    reachable = set(done)
    while grown := {e for _, e, c in held if c in reachable} - reachable:
        reachable |= grown
    assert set(released) == reachable - done


# --- payments: one settlement per attempt -------------------------------------------


class PaymentsMachine(RuleBasedStateMachine):
    """OrderPlaced (again, or changed), retries, confirmations of any intent, type and
    amount, duplicates and status mirrors, in any order: each attempt is settled by at
    most one PaymentAccepted or PaymentDeclined, attempts grow by one per accepted
    retry, and an intent is never used by two attempts."""

    @initialize()
    def begin(self) -> None:
        self.saga = Saga(Scenario((), ()))
        self.pay = self.saga.payments
        self.n = 0

    def _deliver(self, topic: str, event_type: str, payload: dict[str, Any]) -> None:
        self.n += 1
        self.pay.deliver(Msg(topic, "o", f"in{self.n}", event_type, payload))

    @rule(amount=st.sampled_from([100, 200]))
    def order_placed(self, amount: int) -> None:
        payload = {"order_id": "o", "customer_id": "c", "currency": "EUR",
                   "items": [{"sku": "a", "quantity": 1, "unit_amount": amount}],
                   "total_amount": amount, "payment_intent_id": "pi_1",
                   "payment_method": "card"}  # fmt: skip
        self._deliver("checkout.orders.v1", "OrderPlaced", payload)

    @rule(intent=st.sampled_from(["pi_1", "pi_2", "pi_3"]))
    def retry(self, intent: str) -> None:
        payload = {"order_id": "o", "payment_intent_id": intent, "payment_method": "card"}
        self._deliver("checkout.orders.v1", "PaymentRetryRequested", payload)

    @rule(
        intent=st.sampled_from(["pi_1", "pi_2", "pi_3"]),
        kind=st.sampled_from(["payment.authorized", "payment.captured", "payment.failed"]),
        amount=st.sampled_from([100, 200]),
        event=st.integers(1, 4),
        with_order_id=st.booleans(),
    )
    def confirmation(
        self, intent: str, kind: str, amount: int, event: int, with_order_id: bool
    ) -> None:
        c = payments.Confirmation(
            "g", f"evt_{intent}_{event}", kind, f"t_{intent}_{event}", intent,  # type: ignore[arg-type]
            "o" if with_order_id else None, amount, "EUR", "card", None, None,
            "declined" if kind == "payment.failed" else None, None, NOW,
        )  # fmt: skip
        self._deliver("gateway.confirmations.v1", kind, {"confirmation": c})

    @rule(status=st.sampled_from(["PAYMENT_FAILED", "PAID_CONFIRMED", "NEEDS_RECONCILIATION"]))
    def orders_publishes(self, status: str) -> None:
        row = self.pay.orders.get("o")
        if row is None:
            return
        payload = {"order_id": "o", "status": status, "version": row.saga_version + 1,
                   "payment_intent_id": row.order.payment_intent_id}  # fmt: skip
        self._deliver("orders.status.v1", "OrderStatusChanged", payload)

    @invariant()
    def one_settlement_per_attempt(self) -> None:
        events = [m for m in self.saga.bus.published if m.topic == PAYMENTS_TOPIC]
        settled = [m.payload["attempt"] for m in events
                   if m.event_type in ("PaymentAccepted", "PaymentDeclined")]  # fmt: skip
        assert len(settled) == len(set(settled)), settled
        opened = [m.payload for m in events
                  if m.event_type in ("OrderRegistered", "PaymentRetryAccepted")]  # fmt: skip
        assert [p["attempt"] for p in opened] == list(range(1, len(opened) + 1))
        intents = [p["payment_intent_id"] for p in opened]
        assert len(intents) == len(set(intents))
        for m in events:
            if m.event_type in ("PaymentAccepted", "PaymentDeclined"):
                assert m.payload["payment_intent_id"] == intents[m.payload["attempt"] - 1]
                assert m.payload["amount"] == opened[0]["amount"]


PaymentsMachine.TestCase.settings = SETTINGS
test_payments_settle_each_attempt_once = PaymentsMachine.TestCase


# --- capture and refunds: one gateway effect, whatever the gateway answers ----------

scripts = st.lists(behaviour, max_size=5)


@given(
    script=scripts,
    crashes=st.lists(st.booleans(), max_size=8),
    late=st.lists(st.booleans(), max_size=8),
)
@SETTINGS
def test_a_capture_is_made_at_most_once_and_its_outcome_emitted_once(
    script: list[str], crashes: list[bool], late: list[bool]
) -> None:
    """Any answers (declines, 503s, answers lost after the capture was made), workers
    dying after the call, the hold running out between rounds: the gateway holds at
    most one capture; the stored outcome is Captured exactly when it does; one final
    event (CaptureFailed at most once besides); never expired once a call was sent."""
    saga = Saga(Scenario((), ()))
    saga.gateway.create("t", "o", "pi", 100, "authorize")
    saga.gateway.scripts[("t", "capture")] = list(script)  # type: ignore[arg-type]
    cause = Msg("inventory.events.v1", "o", "sr", "StockReserved", {}, 2)
    ctx = {"order_id": "o", "attempt": 1, "payment_intent_id": "pi", "transaction_id": "t",
           "flow": "authorization", "amount": 100, "currency": "EUR", "gateway": "g"}  # fmt: skip
    saga.capture.intents["t"] = IntentRow("pending", ctx, cause)
    rounds = 0
    while saga.capture.due():
        saga.run_round("capture", "t", crash=crashes[rounds] if rounds < len(crashes) else False)
        if rounds < len(late) and late[rounds]:
            saga.now = NOW + CAPTURE_POLICY.hold + timedelta(seconds=1)
        rounds += 1
        assert rounds < 50
    t = saga.gateway.txns["t"]
    row = saga.capture.intents["t"]
    assert len(t.captures) <= 1
    assert (row.state == "captured") == bool(t.captures)
    finals = [m.event_type for m in saga.bus.published if m.event_type != "CaptureFailed"]
    alarms = [m.event_type for m in saga.bus.published].count("CaptureFailed")
    assert len(finals) <= 1
    assert alarms <= 1
    assert finals or alarms
    if row.state == "expired":
        assert t.state == "authorized"
        assert not t.captures


@given(
    flow=st.sampled_from(["authorization", "sale"]),
    script=scripts,
    crashes=st.lists(st.booleans(), max_size=8),
)
@SETTINGS
def test_a_void_or_refund_is_made_at_most_once_and_its_outcome_emitted_once(
    flow: str, script: list[str], crashes: list[bool]
) -> None:
    """Same for compensations: at most one void or refund at the gateway; Succeeded
    exactly when the gateway made it; at most one CompensationFailed (the alarm of rounds
    spent with the outcome unknown, or a failure), and a success event exactly when it
    succeeded — after the alarm too, since an unknown outcome is looked up until settled."""
    saga = Saga(Scenario((), ()))
    saga.gateway.create("t", "o", "pi", 100, "authorize" if flow == "authorization" else "sale")
    action = "void" if flow == "authorization" else "refund"
    saga.gateway.scripts[("t", action)] = list(script)  # type: ignore[arg-type]
    ctx = {"order_id": "o", "attempt": 1, "payment_intent_id": "pi", "transaction_id": "t",
           "flow": flow, "amount": 100, "currency": "EUR", "gateway": "g"}  # fmt: skip
    trigger = "StockReservationFailed"
    saga.refunds.deliver(Msg("inventory.events.v1", "o", "srf", trigger, ctx, 2))
    saga.refunds.deliver(Msg("inventory.events.v1", "o", "srf2", trigger, ctx, 2))  # again
    assert list(saga.refunds.intents) == [("t", action)]
    rounds = 0
    while saga.refunds.due():
        crash = crashes[rounds] if rounds < len(crashes) else False
        saga.run_round("refunds", ("t", action), crash=crash)
        rounds += 1
        assert rounds < 50
    t = saga.gateway.txns["t"]
    done = t.voids if action == "void" else t.refunds
    assert len(done) <= 1
    row = saga.refunds.intents[("t", action)]
    assert (row.state == "succeeded") == bool(done)
    kinds = [m.event_type for m in saga.bus.published]
    assert kinds.count("CompensationFailed") <= 1
    successes = [k for k in kinds if k != "CompensationFailed"]
    assert len(successes) == (1 if row.state == "succeeded" else 0)
    assert successes or kinds == ["CompensationFailed"]
