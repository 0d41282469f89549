"""A steady load of orders across every path of the saga, for the chaos scenarios.

Each order is one ``SagaPath``: how it is paid (authorization, sale, decline, or
requested by paysaga), whether its items are in stock, the gateway simulator's markers
on its payment intent (flaky, declined or lost captures, voids and refunds), and a
retry with another payment after a declined capture. The load acts as the checkout
(``OrderPlaced``/``PaymentRetryRequested`` on Kafka) and as the gateway (the simulator
creates each payment and delivers its signed webhook), records what it sent in an
:class:`~tests.support.invariants.Inputs`, and can deliver every input twice and out
of order, or mix poison records into it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time
import uuid
from typing import Any

import httpx
import psycopg
from aiokafka.errors import KafkaError

from services.devclient import DevClient, envelope, wait_for
from services.runtime.producer import RenewingProducer
from tests.support.invariants import Inputs

CHECKOUT = "checkout.orders.v1"
PRICE = 1500


@dataclasses.dataclass(frozen=True)
class SagaPath:
    name: str
    #: simulator markers on the payment intent
    marker: str
    mode: str  # authorize | sale | decline
    in_stock: bool
    ends: frozenset[str]
    #: reconcile rules this path produces by design
    violations: frozenset[str] = frozenset()
    #: after the first attempt, a retry paid by another authorization
    retry: bool = False
    #: no payment_intent_id: paysaga requests the payment, the customer completes it
    requested: bool = False


def _p(name: str, marker: str, mode: str, in_stock: bool, *ends: str, **kw: Any) -> SagaPath:
    return SagaPath(name, marker, mode, in_stock, frozenset(ends), **kw)


PAID, FAILED, REFUNDED, NEEDS = (
    "PAID_CONFIRMED",
    "PAYMENT_FAILED",
    "REFUNDED",
    "NEEDS_RECONCILIATION",
)
PATHS = (
    _p("authorization", "", "authorize", True, PAID),
    _p("sale", "", "sale", True, PAID),
    _p("decline", "", "decline", True, FAILED),
    _p("out_of_stock", "", "authorize", False, FAILED),
    _p("out_of_stock_sale", "", "sale", False, REFUNDED),
    _p("capture_flaky", "_capture_flaky", "authorize", True, PAID),
    _p("capture_declined", "_capture_declined", "authorize", True, FAILED),
    _p("refund_flaky", "_refund_flaky", "sale", False, REFUNDED),
    _p("void_flaky", "_void_flaky", "authorize", False, FAILED),
    _p(
        "refund_declined",
        "_refund_declined",
        "sale",
        False,
        NEEDS,
        violations=frozenset({"compensation_failed"}),
    ),
    _p("retry", "_capture_declined", "authorize", True, PAID, retry=True),
    _p("requested", "", "authorize", True, PAID, requested=True),
)
#: the gateway does the work and its answer is lost (docs/contract.md §4: looked up, not redone)
LOST_PATHS = (
    _p("capture_lost", "_capture_lost", "authorize", True, PAID),
    _p("void_lost", "_void_lost", "authorize", False, FAILED),
    _p("refund_lost", "_refund_lost", "sale", False, REFUNDED),
)


class Load:
    """Sends ``n`` orders at ``per_second`` in a background thread (``start`` …
    ``finish``); ``twice_out_of_order`` delivers every input twice, shuffled in batches
    (confirmations before their orders, a retry's payment before its retry request)."""

    def __init__(
        self,
        client: DevClient,
        paths: tuple[SagaPath, ...] = PATHS,
        *,
        twice_out_of_order: bool = False,
        widen: frozenset[str] = frozenset(),
        poison_every: int = 0,
    ) -> None:
        self.poison_every = poison_every
        self.client, self.paths, self.shuffled = client, paths, twice_out_of_order
        self.widen = widen  # statuses a scenario's fault may also end an order in
        self.inputs = Inputs(since_ms=int(time.time() * 1000) - 1000)
        self.run = uuid.uuid4().hex[:8]
        self.sku_ok, self.sku_empty = f"sku-{self.run}-ok", f"sku-{self.run}-none"
        self.sent = 0
        self._seen_failed: set[str] = set()  # orders the checkout saw PAYMENT_FAILED
        self.errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._rng = random.Random(self.run)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ---------------------------------------------------------------- driving
    def prepare(self, n: int) -> None:
        self.client.set_stock(self.sku_ok, 2 * n + 10)
        self.client.set_stock(self.sku_empty, 0)
        wait_for(
            lambda: len(self.client.db("inventory", "SELECT sku FROM stock WHERE sku = ANY(%s)",
                                       [self.sku_ok, self.sku_empty])) == 2,
            what="stock set",
        )  # fmt: skip

    def start(self, n: int, per_second: float) -> Load:
        self.prepare(n)
        self._thread = threading.Thread(target=self._run, args=(n, per_second), daemon=True)
        self._thread.start()
        return self

    def wait_sent(self, n: int, timeout: float = 300) -> None:
        wait_for(lambda: self.sent >= n or self.errors, timeout, what=f"{n} orders sent")
        self._raise()

    def stop(self) -> None:
        """Send no further orders (those under way complete): ``n`` is then a bound."""
        self._stop.set()

    def finish(self, timeout: float = 600) -> Inputs:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the load did not finish sending"
        self._raise()
        return self.inputs

    def _raise(self) -> None:
        if self.errors:
            raise AssertionError("the load failed") from self.errors[0]

    def _run(self, n: int, per_second: float) -> None:
        try:
            asyncio.run(self._main(n, per_second))
        except BaseException as exc:
            self.errors.append(exc)

    async def _main(self, n: int, per_second: float) -> None:
        # renewed after a failed send, as a checkout's must be (a broker restart can
        # leave an idempotent producer refused for good: services/runtime/producer.py)
        self._producer = RenewingProducer(self.client.bootstrap, "paysaga-chaos-load", 30000)
        await self._producer.connect()
        self._http = httpx.AsyncClient(timeout=30)
        try:
            if self.shuffled:
                await self._shuffled(n, per_second)
            else:
                tasks: list[asyncio.Task[None]] = []
                for i in range(n):
                    if self._stop.is_set():
                        break
                    tasks.append(asyncio.create_task(self._order(self.paths[i % len(self.paths)])))
                    if self.poison_every and i % self.poison_every == 0:
                        await self._poison(i)
                    await asyncio.sleep(1 / per_second)
                for t in tasks:
                    await t
        finally:
            await self._http.aclose()
            await self._producer.stop()

    # ---------------------------------------------------------------- one order
    def _plan(self, path: SagaPath) -> tuple[str, str | None, dict[str, Any]]:
        order_id = f"ord_{self.run}_{uuid.uuid4().hex[:10]}"
        intent = None if path.requested else f"pi_{uuid.uuid4().hex[:12]}{path.marker}"
        sku = self.sku_ok if path.in_stock else self.sku_empty
        payload: dict[str, Any] = {
            "order_id": order_id,
            "customer_id": f"cust-{order_id}",
            "conference_id": None,
            "currency": "EUR",
            "items": [{"sku": sku, "quantity": 1, "unit_amount": PRICE}],
            "discount_amount": 0,
            "delivery_fee": 0,
            "service_fee": 0,
            "total_amount": PRICE,
            "payment_method": "card",
        }
        if intent is not None:
            payload["payment_intent_id"] = intent
        with self._lock:
            self.inputs.orders[order_id] = path.ends | self.widen
            if path.violations:
                self.inputs.expected_violations[order_id] = path.violations
            self.inputs.unpaid.add(order_id)  # until a payment is sent
        return order_id, intent, payload

    async def _order(self, path: SagaPath) -> None:
        order_id, intent, payload = self._plan(path)
        await self.send(CHECKOUT, order_id, envelope("OrderPlaced", payload))
        if path.requested:
            intent = await self._requested_intent(order_id)
            if intent is None:
                self.sent += 1
                return
            txn = await self._sim(f"/sim/payment_intents/{intent}/confirm", {"mode": path.mode})
        else:
            assert intent is not None
            txn = await self._pay(order_id, intent, path.mode)
        self._paid(txn, order_id)
        if path.retry:  # the customer retries once told the payment failed
            await self._failed(order_id)
            second = f"pi_{uuid.uuid4().hex[:12]}"
            await self.send(CHECKOUT, order_id, self._retry(order_id, second))
            txn = await self._pay(order_id, second, "authorize")
            self._paid(txn, order_id)
            with self._lock:
                self.inputs.retries[order_id] = txn
        self.sent += 1

    async def _failed(self, order_id: str) -> None:
        """A retry of an attempt not yet failed is refused (retry_not_allowed_in_status):
        a checkout offers it once the status says PAYMENT_FAILED — once seen, for good
        (a retry sent twice: its first copy may have moved the order on already)."""
        deadline = time.monotonic() + 300
        while order_id not in self._seen_failed and time.monotonic() < deadline:
            rows = await self._look(
                "orders", "SELECT status FROM orders WHERE order_id = %s", order_id
            )
            if rows and rows[0][0] == "PAYMENT_FAILED":
                self._seen_failed.add(order_id)
                return
            await asyncio.sleep(0.3)
        if order_id not in self._seen_failed:
            raise AssertionError(f"{order_id} never PAYMENT_FAILED")

    def _retry(self, order_id: str, intent: str) -> bytes:
        payload = {"order_id": order_id, "payment_intent_id": intent, "payment_method": "wallet"}
        return envelope("PaymentRetryRequested", payload)

    def _paid(self, txn: str, order_id: str) -> None:
        with self._lock:
            self.inputs.confirmations[txn] = order_id
            self.inputs.unpaid.discard(order_id)

    async def _pay(self, order_id: str, intent: str, mode: str, deliver: bool = True) -> str:
        body = {"order_id": order_id, "payment_intent_id": intent, "amount": PRICE,
                "currency": "EUR", "mode": mode, "deliver": deliver}  # fmt: skip
        return await self._sim("/sim/payments", body)

    async def _sim(self, path: str, body: dict[str, Any]) -> str:
        result = await self._sim_raw(path, body)
        return str(result["transaction_id"])

    async def _sim_raw(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self._http.post(f"{self.client.url('gatewaysim')}{path}", json=body)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    async def _requested_intent(self, order_id: str) -> str | None:
        """The payment intent paysaga requested for the order, as the customer's page
        gets it; None once the request ended without one (refused, or given up on: the
        order then ends by that outcome, unpaid)."""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = await self._look(
                "payments",
                "SELECT state, payment_intent_id FROM payment_requests WHERE order_id = %s",
                order_id,
            )
            if rows and rows[0][1] is not None:
                return str(rows[0][1])
            if rows and rows[0][0] in ("refused", "failed"):
                return None
            await asyncio.sleep(0.3)
        raise AssertionError(f"no payment requested for {order_id}")

    async def _look(self, service: str, sql: str, *params: Any) -> list[tuple[Any, ...]] | None:
        """A checkout's look-up: None while the database is out (it asks again)."""
        try:
            return await asyncio.to_thread(self.client.db, service, sql, *params)
        except psycopg.OperationalError:
            return None

    async def send(self, topic: str, key: str | None, value: bytes) -> tuple[int, int]:
        """Produce like a checkout does: until Kafka has it (a broker restart included)."""
        deadline = time.monotonic() + 180
        while True:
            try:
                md = await self._producer.send_and_wait(
                    topic, value, key.encode() if key else None, []
                )
                return md.partition, md.offset
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _webhook(self, body: str, signature: str) -> None:
        url = f"{self.client.url('bridge')}/webhooks/simgw"
        headers = {"paysaga-signature": signature, "content-type": "application/json"}
        deadline = time.monotonic() + 180
        while True:  # as the gateway does: until the bridge answers 2xx
            try:
                r = await self._http.post(url, content=body.encode(), headers=headers)
                if r.is_success:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the bridge refused a webhook: {body[:200]}")
            await asyncio.sleep(0.5)

    # ---------------------------------------------------------------- twice, out of order
    async def _shuffled(self, n: int, per_second: float, batch: int = 8) -> None:
        done = 0
        while done < n and not self._stop.is_set():
            actions: list[tuple[str, tuple[Any, ...]]] = []
            size = min(batch, n - done)
            for i in range(size):
                path = self.paths[(done + i) % len(self.paths)]
                if path.requested:  # its payment exists only once the order was read
                    actions.append(("order_task", (path,)))
                    continue
                order_id, intent, payload = self._plan(path)
                assert intent is not None
                placed = envelope("OrderPlaced", payload)
                first = await self._sim_raw(
                    "/sim/payments", self._body(order_id, intent, path.mode)
                )
                self._paid(first["transaction_id"], order_id)
                hooks = [first]
                retries: list[bytes] = []
                if path.retry:
                    second = f"pi_{uuid.uuid4().hex[:12]}"
                    hooks.append(
                        await self._sim_raw(
                            "/sim/payments", self._body(order_id, second, "authorize")
                        )
                    )
                    self._paid(hooks[-1]["transaction_id"], order_id)
                    self.inputs.retries[order_id] = hooks[-1]["transaction_id"]
                    retries.append(self._retry(order_id, second))
                for _ in range(2):
                    actions.append(("record", (order_id, placed)))
                    actions += [("hook", (h["body"], h["signature"])) for h in hooks]
                    actions += [("record", (order_id, r)) for r in retries]
            self._rng.shuffle(actions)
            # retries go last, once their first attempt failed (see _failed); the
            # retry's payment may still come before its request
            later = [
                a for a in actions if a[0] == "record" and b'"PaymentRetryRequested"' in a[1][1]
            ]
            actions = [a for a in actions if a not in later]
            for kind, args in actions:
                if kind == "record":
                    await self.send(CHECKOUT, args[0], args[1])
                elif kind == "hook":
                    await self._webhook(*args)
                else:
                    await self._order(*args)
                    continue
            for _, (order_id, value) in later:
                await self._failed(order_id)
                await self.send(CHECKOUT, order_id, value)
            self.sent += size
            done += size
            await asyncio.sleep(size / per_second)

    @staticmethod
    def _body(order_id: str, intent: str, mode: str) -> dict[str, Any]:
        return {"order_id": order_id, "payment_intent_id": intent, "amount": PRICE,
                "currency": "EUR", "mode": mode, "deliver": False}  # fmt: skip

    # ---------------------------------------------------------------- poison
    async def _poison(self, i: int) -> None:
        """One poison record on the checkout's topic, under a key of its own (a poison
        record blocks its key: later records of that key wait for an operator)."""
        key = f"poison_{self.run}_{i}"
        values = (
            b"{not json",
            envelope("OrderPlaced", {"order_id": key}),  # required fields missing
            envelope("OrderPlaced", {"order_id": key, "total_amount": "lots"}),
            json.dumps({"hello": key}).encode(),  # no envelope at all
            # card data the checkout must never send: dead letters are redacted
            envelope("OrderPlaced", {"order_id": key, "card_number": "4111 1111 1111 1111"}),
        )
        p, o = await self.send(CHECKOUT, key, values[i % len(values)])
        with self._lock:
            self.inputs.poison.append((CHECKOUT, p, o))
