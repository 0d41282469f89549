"""Broker failures on the 3-broker cluster (replication factor 3, min.insync.replicas
2, every producer acks=all and idempotent), under orders flowing through the whole
saga: the checkout's OrderPlaced on Kafka, the gateway simulator's signed confirmation
posted to the bridge (again until it answers 2xx, as a gateway does), the status API.

What must hold: every confirmation the bridge acknowledged ends PAID_CONFIRMED with one
capture at the gateway (nothing acknowledged lost, nothing captured twice), and no
service is restarted — producers and consumers ride over the failure by themselves."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from services.devclient import envelope, new_id, wait_for
from services.runtime.kafka import client_options
from services.runtime.topics import CONFIRMATIONS_TOPIC
from tests.cluster.conftest import PRODUCE_TIMEOUT_S, SAGA_TOPICS, Cluster

pytestmark = pytest.mark.cluster

AMOUNT = 1500


@dataclasses.dataclass
class Order:
    order_id: str
    intent: str
    txn: str = ""
    #: monotonic times of the bridge's answers: 2xx (acknowledged) and the others
    acked_at: float | None = None
    ack: dict[str, Any] = dataclasses.field(default_factory=dict)
    refusals: list[tuple[float, int | str]] = dataclasses.field(default_factory=list)


class Load:
    """The checkout places the orders (OrderPlaced, acks=all), then their confirmations
    come at a steady rate: the simulator signs each (``deliver: false``) and it is
    posted to the bridge until the bridge answers 2xx, as the gateway does."""

    def __init__(self, cluster: Cluster, sku: str, n: int) -> None:
        self.c, self.sku = cluster, sku
        self.orders = [Order(new_id("ord"), new_id("pi")) for _ in range(n)]

    async def place(self) -> None:
        producer = AIOKafkaProducer(
            **client_options(self.c.bootstrap), enable_idempotence=True, acks="all"
        )
        await producer.start()
        try:
            sent = [
                await producer.send("checkout.orders.v1", value=self._placed(o),
                                    key=o.order_id.encode())
                for o in self.orders
            ]  # fmt: skip
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

    def _placed(self, o: Order) -> bytes:
        return envelope("OrderPlaced", {
            "order_id": o.order_id, "customer_id": f"cust-{o.order_id}",
            "conference_id": None, "currency": "EUR",
            "items": [{"sku": self.sku, "quantity": 1, "unit_amount": AMOUNT}],
            "discount_amount": 0, "delivery_fee": 0, "service_fee": 0,
            "total_amount": AMOUNT, "payment_intent_id": o.intent, "payment_method": "card",
        })  # fmt: skip

    async def confirm(self, rate: float, at: dict[int, Any], deadline_s: float) -> None:
        """Confirm the orders, ``rate`` a second; call ``at[i]()`` after the i-th."""
        deadline = time.monotonic() + deadline_s
        async with httpx.AsyncClient(timeout=PRODUCE_TIMEOUT_S + 5) as http:
            tasks = []
            for i, order in enumerate(self.orders):
                tasks.append(asyncio.create_task(self._confirm(http, order, deadline)))
                if i in at:
                    await asyncio.to_thread(at[i])
                await asyncio.sleep(1 / rate)  # pacing the load, not waiting on it
            await asyncio.gather(*tasks)

    async def _confirm(self, http: httpx.AsyncClient, o: Order, deadline: float) -> None:
        c = self.c.client
        signed = (
            await http.post(
                f"{c.url('gatewaysim')}/sim/payments",
                json={"order_id": o.order_id, "payment_intent_id": o.intent,
                      "amount": AMOUNT, "currency": "EUR", "mode": "authorize",
                      "deliver": False},
            )
        ).json()  # fmt: skip
        o.txn = signed["transaction_id"]
        headers = {"paysaga-signature": signed["signature"], "content-type": "application/json"}
        while time.monotonic() < deadline:
            try:
                r = await http.post(
                    f"{c.url('bridge')}/webhooks/simgw", content=signed["body"], headers=headers
                )
            except httpx.HTTPError as exc:
                o.refusals.append((time.monotonic(), type(exc).__name__))
            else:
                if r.is_success:
                    o.acked_at, o.ack = time.monotonic(), r.json()
                    return
                o.refusals.append((time.monotonic(), r.status_code))
            await asyncio.sleep(0.5)  # the gateway's retry

    def acknowledged(self) -> list[Order]:
        return [o for o in self.orders if o.acked_at is not None]


def paid_correctly(cluster: Cluster, o: Order) -> bool:
    got = cluster.client.order(o.order_id)
    if not got or got["status"] != "PAID_CONFIRMED":
        return False
    return len(cluster.client.ledger(o.txn)["captures"]) == 1


def wait_all_paid(cluster: Cluster, orders: list[Order], timeout: float = 180) -> list[Order]:
    """Poll until every order is PAID_CONFIRMED with one capture; the ones that are not
    by the deadline are returned (lost)."""
    pending = list(orders)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [o for o in pending if not paid_correctly(cluster, o)]
        if pending:
            time.sleep(0.5)
    return pending


def leaders(cluster: Cluster, topic: str) -> dict[int, int]:
    return {int(p["partition"]): int(p["leader"]) for p in cluster.partitions([topic])}  # type: ignore[call-overload]


def test_leader_of_a_busy_partition_killed_under_load(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    sku = new_id("sku")
    cluster.set_stock(sku, 100_000)
    pids = cluster.service_pids()
    assert all(pids.values()), pids
    led: dict[str, Any] = {}

    def kill_leader() -> None:
        # the busiest partition of the bridge's topic so far, and its leader
        ends = _end_offsets(cluster, CONFIRMATIONS_TOPIC)
        busy = max(ends, key=lambda p: ends[p])
        victim = leaders(cluster, CONFIRMATIONS_TOPIC)[busy]
        led["partitions"] = {p for p, n in leaders(cluster, CONFIRMATIONS_TOPIC).items()
                             if n == victim}  # fmt: skip
        led["node"], led["busy"] = victim, busy
        cluster.kill(cluster.node(victim))
        led["at"] = time.monotonic()

    load = Load(cluster, sku, 200)
    asyncio.run(load.place())
    started = time.monotonic()
    asyncio.run(load.confirm(rate=8, at={60: kill_leader}, deadline_s=150))
    acked = load.acknowledged()
    lost = wait_all_paid(cluster, acked)
    after_kill = [o for o in acked if o.ack.get("partition") in led["partitions"]
                  and o.acked_at and o.acked_at > led["at"]]  # fmt: skip
    recover = min(o.acked_at for o in after_kill if o.acked_at) - led["at"]
    refused = [r for o in load.orders for _, r in o.refusals]
    with capsys.disabled():
        print(
            f"\n[leader kill] node {led['node']} (leader of busy partition {led['busy']} of"
            f" {CONFIRMATIONS_TOPIC}, and of {sorted(led['partitions'])}) killed -9 after 60"
            f" orders: orders {len(load.orders)}, acknowledged {len(acked)}, lost {len(lost)},"
            f" bridge refusals (retried) {len(refused)} ({sorted(set(map(str, refused)))}),"
            f" time to recover {recover:.1f}s (kill to the first acknowledgement on its"
            f" partitions), run {time.monotonic() - started:.0f}s"
        )
    assert len(acked) == len(load.orders), "every confirmation was acknowledged in the end"
    assert lost == [], [o.order_id for o in lost]
    assert cluster.service_pids() == pids, "no service restarted"


def _end_offsets(cluster: Cluster, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tps = [TopicPartition(topic, p) for p in leaders(cluster, topic)]

    async def ends() -> dict[int, int]:
        consumer = AIOKafkaConsumer(**client_options(cluster.bootstrap))
        await consumer.start()
        try:
            return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
        finally:
            await consumer.stop()

    return asyncio.run(ends())


def test_broker_stopped_and_restarted_rejoins_and_catches_up(cluster: Cluster) -> None:
    sku = new_id("sku")
    cluster.set_stock(sku, 100_000)
    pids = cluster.service_pids()
    victim = cluster.node(2)
    cluster.stop(victim)
    # while it is down, orders go on: two replicas of three are in sync, enough for acks
    during = Load(cluster, sku, 40)
    asyncio.run(during.place())
    asyncio.run(during.confirm(rate=10, at={}, deadline_s=90))
    assert wait_all_paid(cluster, during.acknowledged()) == []
    assert len(during.acknowledged()) == len(during.orders)
    parts = cluster.partitions(SAGA_TOPICS)
    assert all(victim.node_id not in p["isr"] for p in parts)  # type: ignore[operator]

    cluster.start(victim)
    # it rejoins and its replicas catch up: every partition three in sync again
    cluster.wait_in_sync(SAGA_TOPICS, timeout=120)
    after = Load(cluster, sku, 20)
    asyncio.run(after.place())
    asyncio.run(after.confirm(rate=10, at={}, deadline_s=60))
    assert wait_all_paid(cluster, after.acknowledged()) == []
    assert len(after.acknowledged()) == len(after.orders)
    assert cluster.service_pids() == pids, "no service restarted"


def test_two_brokers_down_stops_acknowledgements_until_one_returns(cluster: Cluster) -> None:
    sku = new_id("sku")
    cluster.set_stock(sku, 100_000)
    pids = cluster.service_pids()
    load = Load(cluster, sku, 6)
    asyncio.run(load.place())
    for o in load.orders:
        cluster.client.wait_status(o.order_id, "PENDING_PAYMENT")

    cluster.kill(cluster.node(2))
    cluster.kill(cluster.node(3))
    # the gateway confirms; the bridge cannot get two replicas to acknowledge any of it
    for o in load.orders:
        o.txn = cluster.client.pay(o.order_id, o.intent, AMOUNT)["transaction_id"]
    signed = cluster.client.pay(load.orders[0].order_id, load.orders[0].intent, AMOUNT,
                                deliver=False)  # fmt: skip
    refused = cluster.client.post_webhook(signed["body"].encode(), signed["signature"])
    assert refused.status_code == 503, refused.text
    wait_for(
        lambda: all(cluster.client.ledger(o.txn)["delivery_attempts"] >= 2 for o in load.orders),
        60,
        "the gateway retrying every refused webhook",
    )
    for o in load.orders:
        assert cluster.client.ledger(o.txn)["delivery"] == "pending"  # never acknowledged
        assert cluster.client.order(o.order_id)["status"] == "PENDING_PAYMENT"  # type: ignore[index]

    cluster.start(cluster.node(2))  # one broker returns: two replicas again
    assert wait_all_paid(cluster, load.orders, timeout=180) == []
    # an attempt the bridge stored but answered after the simulator's timeout stays
    # "pending" until the simulator's next attempt (after its backoff) is acknowledged
    wait_for(
        lambda: all(cluster.client.ledger(o.txn)["delivery"] == "delivered" for o in load.orders),
        180,
        "every webhook acknowledged",
    )
    assert cluster.service_pids() == pids, "no service restarted"
