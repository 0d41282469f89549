"""Property tests of the composed saga, in memory (tests/support/saga_model.py): any
interleaving, duplication and delay of the saga's events ends in a state that satisfies
docs/contract.md §3.1 and §3.3, and the same final statuses as in-order delivery."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from services.runtime.topics import (
    CAPTURE_TOPIC,
    CHECKOUT_ORDERS_TOPIC,
    INVENTORY_TOPIC,
    PAYMENTS_TOPIC,
    REFUNDS_TOPIC,
)
from tests.support.saga_model import (
    AttemptSpec,
    OrderSpec,
    Saga,
    Scenario,
    examples,
)

SKUS = ("sku-a", "sku-b", "sku-c")
behaviours = st.lists(st.sampled_from(["ok", "declined", "unavailable", "lost"]), max_size=3)
scripts = st.lists(st.sampled_from(["ok", "unavailable", "lost"]), max_size=3)


@st.composite
def attempts(draw: st.DrawFn) -> AttemptSpec:
    kind = draw(st.sampled_from(["authorize", "sale", "decline"]))
    return AttemptSpec(
        kind,
        capture=tuple(draw(behaviours)),
        void=tuple(draw(behaviours)),
        refund=tuple(draw(behaviours)),
    )


@st.composite
def scenarios(draw: st.DrawFn, contended: bool) -> Scenario:
    """1-3 orders of 1-2 lines. Without contention each order has SKUs of its own, so
    its outcome cannot depend on which order reserved first."""
    n = draw(st.integers(1, 3))
    stock = []
    orders = []
    for i in range(n):
        if contended:
            skus = draw(st.lists(st.sampled_from(SKUS), min_size=1, max_size=2, unique=True))
        else:
            skus = [f"sku-{i}-{j}" for j in range(draw(st.integers(1, 2)))]
            stock += [(sku, draw(st.integers(0, 4))) for sku in skus]
        items = tuple((sku, draw(st.integers(1, 2))) for sku in skus)
        tries = tuple(draw(st.lists(attempts(), min_size=1, max_size=3)))
        orders.append(OrderSpec(f"o{i}", items, draw(st.integers(1, 50)) * 100, tries))
    if contended:
        stock = [(sku, draw(st.integers(0, 4))) for sku in SKUS]
    return Scenario(tuple(stock), tuple(orders))


def start(scenario: Scenario) -> Saga:
    """Stock levels first (the catalog is set before the orders come), then the orders."""
    saga = Saga(scenario)
    for sku, available in scenario.stock:
        saga.set_stock(sku, available)
    saga.drain()
    for spec in scenario.orders:
        saga.place_order(spec)
    return saga


PICK = st.integers(0, 10**6)
SEED = st.integers(0, 2**32 - 1)


class Schedule(RuleBasedStateMachine):
    """Hypothesis schedules the saga: which partition delivers next, which record is
    delivered again (or which webhook the gateway sends again), which worker round
    runs, when a customer retries. After the steps the rest is drained in order, and
    every record and webhook is delivered once more: nothing final may change."""

    saga: Saga

    def begin(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.saga = start(scenario)
        self.rng = random.Random(seed)  # the order of the drain after the steps

    @precondition(lambda self: self.saga.bus.pending())
    @rule(i=PICK)
    def deliver(self, i: int) -> None:
        pending = self.saga.bus.pending()
        self.saga.deliver(*pending[i % len(pending)])

    @precondition(lambda self: self.saga.bus.published)
    @rule(i=PICK)
    def deliver_again(self, i: int) -> None:
        published = self.saga.bus.published
        self.saga.bus.republish(published[i % len(published)])

    @precondition(lambda self: self.saga.webhooks)
    @rule(i=PICK, resigned=st.booleans())
    def gateway_sends_again(self, i: int, resigned: bool) -> None:
        """The same bytes again, or re-signed: a new delivery that only payments'
        semantic dedupe (gateway event id, transaction + type) recognises."""
        msg = self.saga.webhooks[i % len(self.saga.webhooks)]
        self.saga.webhook(msg.payload["confirmation"], None if resigned else msg.event_id)

    @precondition(lambda self: self.saga.rounds_due())
    @rule(i=PICK)
    def worker_round(self, i: int) -> None:
        due = self.saga.rounds_due()
        self.saga.run_round(*due[i % len(due)])

    @precondition(lambda self: self.saga.retry_due())
    @rule(i=PICK)
    def customer_retries(self, i: int) -> None:
        due = self.saga.retry_due()
        self.saga.customer_retries(due[i % len(due)])

    @invariant()
    def money_rules_hold(self) -> None:
        if hasattr(self, "saga"):
            assert self.saga.safety_violations() == []

    def teardown(self) -> None:
        if not hasattr(self, "saga"):
            return
        saga = self.saga
        saga.drain(self.rng)
        assert saga.final_violations() == []
        final = saga.final_statuses()
        self.compare(final)
        for msg in list(saga.bus.published):
            saga.bus.republish(msg)
        for msg in list(saga.webhooks):
            saga.webhook(msg.payload["confirmation"])
        saga.drain(self.rng)
        assert saga.final_statuses() == final, "a final status changed on late duplicates"
        assert saga.final_violations() == []

    def compare(self, final: dict[str, tuple[str, str | None, int]]) -> None:
        pass


class Faults(Schedule):
    """Also: orders compete for the same units, the catalog changes stock levels in the
    middle of the traffic (lowering one below what is held is refused), and a worker
    dies after its gateway call, before storing the outcome."""

    @initialize(scenario=scenarios(contended=True), seed=SEED)
    def start_contended(self, scenario: Scenario, seed: int) -> None:
        self.begin(scenario, seed)

    @precondition(lambda self: self.saga.retry_possible())
    @rule(i=PICK)
    def customer_retries_early(self, i: int) -> None:
        """A retry before the attempt failed (or while its outcome is still on its way):
        held or rejected; its payment then waits as unmatched."""
        due = self.saga.retry_possible()
        self.saga.customer_retries(due[i % len(due)])

    @precondition(lambda self: self.saga.rounds_due())
    @rule(i=PICK)
    def worker_dies_mid_round(self, i: int) -> None:
        due = self.saga.rounds_due()
        self.saga.run_round(*due[i % len(due)], crash=True)

    @rule(i=PICK, available=st.integers(0, 6))
    def catalog_sets_stock(self, i: int, available: int) -> None:
        skus = sorted({sku for o in self.scenario.orders for sku, _ in o.items})
        self.saga.set_stock(skus[i % len(skus)], available)


#: a failed attempt flagged after it failed (its void failed), or flagged first and
#: failed once its stalled void was settled
_FLAGGED_AROUND_FAILURE = {
    ("PAYMENT_FAILED", "NEEDS_RECONCILIATION"),
    ("NEEDS_RECONCILIATION", "PAYMENT_FAILED"),
}


def _raced_retry(saga: Saga) -> bool:
    """An attempt was NEEDS_RECONCILIATION just before or after PAYMENT_FAILED: whether
    the customer's retry reached payments before payments mirrored the status that
    followed is a race of the customer, not of delivery. Payments refuses a retry while
    the status it last saw is NEEDS_RECONCILIATION (docs/contract.md §2.1: accepted only
    in PAYMENT_FAILED), and keeps the retry's payment unmatched for an operator."""
    return any(
        (e.change.previous_status, e.change.status) in _FLAGGED_AROUND_FAILURE
        for emitted in saga.orders.emitted.values()
        for e in emitted
    )


class Convergence(Schedule):
    """Orders with units of their own: the final statuses must be those of in-order
    delivery of the same inputs."""

    @initialize(scenario=scenarios(contended=False), seed=SEED)
    def start_own_stock(self, scenario: Scenario, seed: int) -> None:
        self.begin(scenario, seed)

    def compare(self, final: dict[str, tuple[str, str | None, int]]) -> None:
        reference = start(self.scenario)
        reference.drain()
        if _raced_retry(self.saga) or _raced_retry(reference):
            return
        assert final == reference.final_statuses(), "differs from in-order delivery"


SETTINGS = settings(max_examples=examples(100), stateful_step_count=80, deadline=None)
Faults.TestCase.settings = SETTINGS
Convergence.TestCase.settings = SETTINGS
test_money_rules_hold_under_faults = Faults.TestCase
test_any_delivery_order_converges = Convergence.TestCase


def _deliver_all(saga: Saga, group: str, topic: str) -> None:
    while (pending := [p for p in saga.bus.pending() if p[:2] == (group, topic)]) != []:
        saga.deliver(*pending[0])


def test_a_retry_accepted_by_payments_is_not_lost() -> None:
    """The minimal schedule the saga properties found. Attempt 1 is authorized, its
    capture declined (PAYMENT_FAILED, capture_declined) and its void declined; the
    customer retries on seeing PAYMENT_FAILED. Payments, still mirroring PAYMENT_FAILED,
    accepts the retry; orders applies the void's CompensationFailed (another topic)
    before PaymentRetryAccepted. Rules: the customer's new payment ends where its order
    says (§3.1) and gets its one notification (§3.3); payments and orders agree on the
    attempt."""
    first = AttemptSpec("authorize", capture=("declined",), void=("declined",))
    spec = OrderSpec("o0", (("sku", 1),), 100, (first, AttemptSpec("authorize")))
    saga = Saga(Scenario((("sku", 1),), (spec,)))
    saga.set_stock("sku", 1)
    saga.drain()
    saga.place_order(spec)
    while steps := [p for p in saga.bus.pending() if p[0] != "refunds"] + [
        r for r in saga.rounds_due() if r[0] == "capture"
    ]:
        if steps[0][0] == "capture" and len(steps[0]) == 2:
            saga.run_round(*steps[0])
        else:
            saga.deliver(*steps[0])
    assert saga.orders.views["o0"].status == "PAYMENT_FAILED"
    assert saga.payments.orders["o0"].saga_status == "PAYMENT_FAILED"
    _deliver_all(saga, "refunds", INVENTORY_TOPIC)
    _deliver_all(saga, "refunds", CAPTURE_TOPIC)
    saga.run_round("refunds", ("txn_o0_1", "void"))  # declined: CompensationFailed
    saga.customer_retries("o0")  # the customer sees PAYMENT_FAILED
    _deliver_all(saga, "payments", CHECKOUT_ORDERS_TOPIC)  # accepted: attempt 2
    _deliver_all(saga, "orders", REFUNDS_TOPIC)  # NEEDS_RECONCILIATION (void_failed)
    _deliver_all(saga, "orders", PAYMENTS_TOPIC)  # PaymentRetryAccepted: ignored
    saga.drain()

    assert saga.gateway.txns["txn_o0_2"].state == "captured"  # the customer paid again
    assert saga.final_violations() == []
