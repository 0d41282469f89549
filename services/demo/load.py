"""The demo's load phase: a small conference sells its tickets through every path of the
saga at once.

Four ticket types, three of them with a quota smaller than their demand: those sell
out during the run, so the orders past a quota end out of stock (an authorization
voided → PAYMENT_FAILED, a sale refunded → REFUNDED). The load acts as the checkout
(``OrderPlaced``, ``PaymentRetryRequested`` on Kafka) and as the gateway (the simulator
creates each payment and delivers its signed webhook), a few orders at a time at a
steady rate, and reads ``orders.status.v1`` and ``payments.requests.v1`` as they come
to see each order reach its final status."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.devclient import DevClient, envelope, order_placed, wait_for
from services.runtime.kafka import client_options
from services.runtime.topics import PAYMENT_REQUESTS_TOPIC as REQUESTS_TOPIC
from services.runtime.topics import STATUS_TOPIC, partitions_of

PAID, FAILED, REFUNDED = "PAID_CONFIRMED", "PAYMENT_FAILED", "REFUNDED"
FINAL = (PAID, FAILED, REFUNDED, "NEEDS_RECONCILIATION")
#: orders started per second, and at most this many under way (the saga does ~5/s here)
RATE, IN_FLIGHT = 5.0, 16
WAIT_S = 90.0  # for one status of one order


@dataclasses.dataclass(frozen=True)
class Path:
    name: str
    expect: str
    mode: str = "authorize"  # authorize | sale | decline
    marker: str = ""  # the simulator's markers on the payment intent
    retry: bool = False  # declined, then paid with a wallet
    requested: bool = False  # no payment_intent_id: paysaga requests the payment
    unmatched_first: bool = False  # the payment reaches paysaga before its order
    duplicates: int = 0  # extra deliveries of the same webhook
    #: a bad webhook first, rejected with this reason, then the genuine one
    bad: str = ""

    @property
    def out_of_stock(self) -> str:
        """The status an order of this path ends in when its tickets ran out."""
        return REFUNDED if self.mode == "sale" else FAILED


PATHS = (
    Path("authorize → capture", PAID),
    Path("sale", PAID, mode="sale"),
    Path("declined by the gateway", FAILED, mode="decline"),
    Path("declined, retried with a wallet", PAID, mode="decline", retry=True),
    Path("paysaga requests the payment", PAID, requested=True),
    Path("capture answers 503 twice", PAID, marker="_capture_flaky"),
    Path("capture declined", FAILED, marker="_capture_declined"),
    Path("capture response lost", PAID, marker="_capture_lost"),
    Path("payment before its order", PAID, unmatched_first=True),
    Path("webhook delivered 3 times", PAID, duplicates=2),
    Path("bad signature, then genuine", PAID, bad="signature_invalid"),
    Path("wrong amount, then right", PAID, bad="amount_mismatch"),
)


@dataclasses.dataclass(frozen=True)
class Ticket:
    kind: str
    price: int
    #: the quota as a share of the orders that would buy it (None: room for all)
    quota_share: float | None


TICKETS = (
    Ticket("conference-pass", 29000, None),
    Ticket("early-bird", 19000, 0.6),
    Ticket("workshop", 12000, 0.75),
    Ticket("speaker-dinner", 8500, 0.5),
)


@dataclasses.dataclass
class Order:
    order_id: str
    path: Path
    ticket: Ticket
    sku: str
    intent: str | None
    sent_at: float = 0.0  # when the input that settles it was sent (monotonic)
    final_at: float = 0.0  # when its final status was seen on orders.status.v1
    status: str = "UNKNOWN"
    reason: str | None = None
    error: str = ""

    @property
    def latency_s(self) -> float | None:
        return self.final_at - self.sent_at if self.final_at and self.sent_at else None


@dataclasses.dataclass
class Load:
    run: str
    orders: list[Order]
    quotas: dict[str, int]  # by sku
    started_at: float  # time.time() before anything was sent
    duplicates_sent: int = 0
    #: payments' count of webhook copies its inbox absorbed, before the load
    duplicates_before: int = 0
    rejected_sent: dict[str, int] = dataclasses.field(default_factory=dict)

    def demand(self, sku: str) -> int:
        return sum(1 for o in self.orders if o.sku == sku)


def plan(n: int) -> Load:
    """``n`` orders, round robin over the paths. Orders that end paid buy the ticket
    types in turn; the others (declined, capture declined: a reservation held, then
    released) buy the pass, which has room for all, so what sells out is deterministic:
    per limited ticket, exactly its quota sold, the rest out of stock."""
    run = uuid.uuid4().hex[:8]
    orders: list[Order] = []
    paid = 0
    for i in range(n):
        path = PATHS[i % len(PATHS)]
        ticket = TICKETS[paid % len(TICKETS)] if path.expect == PAID else TICKETS[0]
        paid += path.expect == PAID
        order_id = f"conf_{run}_{i:04d}"
        intent = None if path.requested else f"pi_{uuid.uuid4().hex[:12]}{path.marker}"
        sku = f"{run}-{ticket.kind}"
        orders.append(Order(order_id, path, ticket, sku, intent))
    load = Load(run, orders, {}, time.time())
    for t in TICKETS:
        sku = f"{run}-{t.kind}"
        demand = load.demand(sku)
        load.quotas[sku] = demand if t.quota_share is None else max(1, int(demand * t.quota_share))
    for o in orders:
        load.duplicates_sent += o.path.duplicates
        if o.path.bad:
            load.rejected_sent[o.path.bad] = load.rejected_sent.get(o.path.bad, 0) + 1
    return load


class Watcher:
    """Reads orders.status.v1 and payments.requests.v1 from their ends at start: the
    latest status of each of the load's orders (and when it was seen), and the payment
    intent paysaga requested for it."""

    def __init__(self, bootstrap: str, order_ids: set[str]) -> None:
        self.bootstrap, self.ids = bootstrap, order_ids
        self.status: dict[str, dict[str, Any]] = {}
        self.seen_at: dict[str, float] = {}
        self.requested: dict[str, str] = {}
        self.changed = asyncio.Condition()
        self._consumer = AIOKafkaConsumer(**client_options(bootstrap), enable_auto_commit=False)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        tps = await partitions_of(self.bootstrap, names=[STATUS_TOPIC, REQUESTS_TOPIC])
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, before anything is sent
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for msgs in batch.values():
                for m in msgs:
                    key = m.key.decode() if m.key else ""
                    if key not in self.ids:
                        continue
                    payload = json.loads(m.value)["payload"]
                    if m.topic == REQUESTS_TOPIC:
                        self.requested[key] = payload["payment_intent_id"]
                    elif payload["version"] > self.status.get(key, {}).get("version", 0):
                        self.status[key], self.seen_at[key] = payload, now
            if batch:
                async with self.changed:
                    self.changed.notify_all()

    async def until(
        self, order_id: str, check: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        def reached() -> bool:
            return order_id in self.status and check(self.status[order_id])

        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(reached), WAIT_S)
            except TimeoutError:
                now = self.status.get(order_id, {}).get("status")
                raise TimeoutError(f"no {what} within {WAIT_S:.0f}s (now {now})") from None
        return self.status[order_id]

    async def requested_intent(self, order_id: str) -> str:
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: order_id in self.requested), WAIT_S
                )
            except TimeoutError:
                raise TimeoutError("no payment requested") from None
        return self.requested[order_id]


class Driver:
    """Sends one order's inputs as the checkout and the gateway would."""

    def __init__(self, client: DevClient, watcher: Watcher) -> None:
        self.client, self.watcher = client, watcher
        self.producer = AIOKafkaProducer(
            **client_options(client.bootstrap), enable_idempotence=True, acks="all"
        )
        self.http = httpx.AsyncClient(timeout=30)

    async def place(self, o: Order) -> None:
        items = [(o.sku, 1, o.ticket.price)]
        value = order_placed(o.order_id, o.intent, items, conference=f"conf-{o.sku[:8]}")
        await self.producer.send_and_wait("checkout.orders.v1", value, o.order_id.encode())

    async def gateway(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post(f"{self.client.url('gatewaysim')}{path}", json=body)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    async def pay(
        self, o: Order, intent: str, mode: str, *, amount: int = 0, deliver: bool = True
    ) -> dict[str, Any]:
        body = {"order_id": o.order_id, "payment_intent_id": intent, "currency": "EUR",
                "amount": amount or o.ticket.price, "mode": mode, "deliver": deliver}  # fmt: skip
        return await self.gateway("/sim/payments", body)

    async def webhook(self, body: str, signature: str) -> None:
        r = await self.http.post(
            f"{self.client.url('bridge')}/webhooks/simgw",
            content=body.encode(),
            headers={"paysaga-signature": signature, "content-type": "application/json"},
        )
        r.raise_for_status()

    async def settle(self, o: Order) -> None:
        """Every input of the order, then its final status."""
        p = o.path
        if p.unmatched_first:
            assert o.intent is not None
            await self.pay(o, o.intent, p.mode)
            o.sent_at = time.monotonic()
            await self.place(o)
        else:
            await self.place(o)
            if p.requested:
                o.intent = await self.watcher.requested_intent(o.order_id)
                o.sent_at = time.monotonic()
                await self.gateway(f"/sim/payment_intents/{o.intent}/confirm", {"mode": p.mode})
            else:
                await self._pay_when_pending(o)
        if p.retry:  # the customer retries once told the payment failed
            await self.watcher.until(o.order_id, lambda s: s["status"] == FAILED, "PAYMENT_FAILED")
            o.intent = f"pi_{uuid.uuid4().hex[:12]}"
            retry = {
                "order_id": o.order_id,
                "payment_intent_id": o.intent,
                "payment_method": "wallet",
            }
            await self.producer.send_and_wait(
                "checkout.orders.v1",
                envelope("PaymentRetryRequested", retry),
                o.order_id.encode(),
            )
            o.sent_at = time.monotonic()
            await self.pay(o, o.intent, "authorize")
        final = await self.watcher.until(
            o.order_id,
            lambda s: s["status"] in FINAL and s["payment_intent_id"] == o.intent,
            "final status",
        )
        o.status, o.reason = final["status"], final["reason"]
        o.final_at = self.watcher.seen_at[o.order_id]

    async def _pay_when_pending(self, o: Order) -> None:
        assert o.intent is not None
        p = o.path
        await self.watcher.until(o.order_id, lambda s: s["status"] == "PENDING_PAYMENT", "order")
        if p.bad == "amount_mismatch":  # a payment of the wrong amount, refused
            await self.pay(o, o.intent, p.mode, amount=o.ticket.price + 100)
        genuine = await self.pay(o, o.intent, p.mode, deliver=not p.bad)
        o.sent_at = time.monotonic()
        if p.bad == "signature_invalid":  # a tampered copy first: rejected, then the real one
            price = f'"amount":{o.ticket.price}'
            tampered = genuine["body"].replace(price, f'"amount":{o.ticket.price - 1}')
            assert tampered != genuine["body"]
            await self.webhook(tampered, genuine["signature"])
        if p.bad:
            o.sent_at = time.monotonic()
            await self.webhook(genuine["body"], genuine["signature"])
        for _ in range(p.duplicates):
            await self.webhook(genuine["body"], genuine["signature"])


def absorbed_duplicates(client: DevClient) -> int | None:
    """Webhook copies (same bytes, same signature) payments' inbox absorbed since it
    started: ``paysaga_records_total{outcome="duplicate"}`` of gateway.confirmations.v1."""
    try:
        text = httpx.get(f"{client.url('payments')}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("paysaga_records_total{") and all(
            label in line for label in ('outcome="duplicate"', 'topic="gateway.confirmations.v1"')
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def set_stock(client: DevClient, load: Load) -> None:
    for sku, quota in load.quotas.items():
        client.set_stock(sku, quota)
    skus = list(load.quotas)
    wait_for(
        lambda: (
            len(client.db("inventory", "SELECT sku FROM stock WHERE sku = ANY(%s)", skus))
            == len(skus)
        ),
        what="the ticket quotas set",
    )


def run(client: DevClient, n: int, on_final: Callable[[Order], None] | None = None) -> Load:
    """Plan ``n`` orders, set the quotas, send the orders at ``RATE`` per second with at
    most ``IN_FLIGHT`` under way, and return once each is final (or given up on:
    ``Order.error`` says why)."""
    load = plan(n)
    set_stock(client, load)
    load.duplicates_before = absorbed_duplicates(client) or 0
    asyncio.run(_drive(client, load, on_final or (lambda o: None)))
    return load


async def _drive(client: DevClient, load: Load, on_final: Callable[[Order], None]) -> None:
    watcher = Watcher(client.bootstrap, {o.order_id for o in load.orders})
    await watcher.start()
    driver = Driver(client, watcher)
    await driver.producer.start()
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(o: Order) -> None:
        try:
            await driver.settle(o)
        except (TimeoutError, httpx.HTTPError) as exc:
            o.error = str(exc) or type(exc).__name__
            o.status = watcher.status.get(o.order_id, {}).get("status", "UNKNOWN")
        finally:
            slots.release()
            on_final(o)

    try:
        tasks = []
        for o in load.orders:
            await slots.acquire()
            tasks.append(asyncio.create_task(one(o)))
            await asyncio.sleep(1 / RATE)
        await asyncio.gather(*tasks)
    finally:
        await driver.http.aclose()
        await driver.producer.stop()
        await watcher.stop()
