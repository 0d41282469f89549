"""``make bench``: the saga measured as a user sees it, beside the limits of its
machinery, in one run on one machine.

``python -m benchmarks.saga [--quick] [--p99-ms 250] [--instances N …]`` brings up its
own stack (profile ``bench``: own ports and folders; ``PAYSAGA_BENCH_PORT_SHIFT`` moves
them), then:

1. **Limits.** (a) a raw aiokafka chain of ``HOPS`` consume → produce processes — one
   per hop an order takes — passing saga-sized records with ``acks=all`` and batching;
   (b) a raw psycopg loop of one consumed record's transaction (inbox insert, state
   update, outbox insert, position update) on as many connections as the saga has
   consuming services, ``synchronous_commit`` on. Events/s and CPU per event.
2. **The saga, open loop.** Orders on ``checkout.orders.v1`` and, a second later, their
   signed confirmations on ``gateway.confirmations.v1`` at stepped offered rates (each
   a payment the gateway simulator knows, so captures are real gateway calls; one in
   five a sale), until a step's p99 passes the limit or its backlog keeps growing.
   Latency end to end (confirmation record → ``PAID_CONFIRMED`` on ``orders.status.v1``)
   and per step, from record timestamps; CPU per order by process from /proc. One
   ladder per ``--instances`` entry (default 1 then 2; ``--quick``: 1): the services
   restarted with that many instances of each consuming service (payments, inventory,
   capture, refunds, orders: members of the same consumer groups), the first step only
   once every group is stable with all its members assigned partitions; a service's CPU
   is the sum of its instances.
3. **Ratios**: saga orders/s ÷ each limit's orders/s.
4. **Bridge ingest**: signed webhooks over HTTP to Kafka (``acks=all``), bounded
   concurrency; webhooks/s and p99.

Prints a table; saves ``benchmarks/results/<date>.json`` (``<date>-quick.json``; a later
run on the same day ``<date>b``, ``<date>c`` …: a saved run is never overwritten) and a
PNG plot beside it (a series per ladder). Everything is bounded in count and time:
~15 minutes, ``--quick`` about one (two with ``--instances 1 2``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from rich.table import Table

from benchmarks import stats
from services import devstack
from services.devclient import envelope, order_placed
from services.devstack.profiles import service_port
from services.runtime.kafka import client_options
from services.runtime.settings import SERVICES, database_url_of, libpq_conninfo
from services.runtime.signature import sign
from services.runtime.terminal import make_console
from services.runtime.topics import (
    AUDIT_TOPIC,
    CAPTURE_TOPIC,
    CATALOG_TOPIC,
    CHECKOUT_ORDERS_TOPIC,
    CONFIRMATIONS_TOPIC,
    INVENTORY_TOPIC,
    NOTIFICATIONS_TOPIC,
    PAYMENTS_TOPIC,
    REFUNDS_TOPIC,
    STATUS_TOPIC,
    TOPICS_FILE,
)

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE = "bench"
GATEWAY = "simgw"
console = make_console()

#: Consume → produce hops of one authorize order (topics.yaml): the checkout's order
#: (payments → OrderRegistered, orders → PENDING_PAYMENT), then the confirmation
#: (payments → PaymentAccepted, inventory → StockReserved, capture → PaymentCaptured,
#: orders → PAID_CONFIRMED).
HOPS = 6
PARTITIONS = 6
#: one order's records, by topic, as the collector reads them
TRACKED = (
    CHECKOUT_ORDERS_TOPIC,
    CONFIRMATIONS_TOPIC,
    PAYMENTS_TOPIC,
    INVENTORY_TOPIC,
    CAPTURE_TOPIC,
    REFUNDS_TOPIC,
    AUDIT_TOPIC,
    STATUS_TOPIC,
    NOTIFICATIONS_TOPIC,
)
#: per-step latency: (step, from milestone, to milestone); milestones are the first
#: record of that label for the order
STEPS = (
    ("payments", "confirmation", "PaymentAccepted"),
    ("inventory", "PaymentAccepted", "StockReserved"),
    ("capture", "StockReserved", "captured"),
    ("orders", "captured", "PAID_CONFIRMED"),
)
FINAL = {"PAID_CONFIRMED", "PAYMENT_FAILED", "REFUNDED", "NEEDS_RECONCILIATION"}
CONFIRM_AFTER_S = 1.0  # the customer pays a second after the checkout placed the order
SALE_EVERY = 5  # one order in five is a sale (already captured by the gateway)
SKUS = [f"bench-sku-{i}" for i in range(8)]
#: how long the services' consumer groups may take to settle before the first step
GROUPS_SETTLE_S = 120.0
#: how long a restarted monitor may take to recover its table before the ladder starts
MONITOR_READY_S = 600.0
AMOUNT = 1500


def mode(**quick_full: Any) -> Any:
    return quick_full["quick" if ARGS.quick else "full"]


ARGS = argparse.Namespace(quick=False, start_rate=2.0)


# ------------------------------------------------------------------------------- CPU


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat from field 3 (state) on; [] when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def cpu_s(pid: int, children: bool = False) -> float:
    """utime + stime of ``pid`` (plus cutime + cstime: its reaped children), seconds."""
    f = _stat(pid)
    if not f:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / CLK_TCK


def postgres_cpu_s(postmaster: int) -> float:
    """PostgreSQL's CPU: the postmaster, its live backends, and (cutime/cstime) the
    backends that exited since it started."""
    total = cpu_s(postmaster, children=True)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat(int(entry.name))
            if f and int(f[1]) == postmaster:
                total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


def stack_processes(p: devstack.Profile) -> dict[str, Callable[[], float]]:
    """CPU probes of every process of the bench stack: each service (the sum of its
    running instances), PostgreSQL, Kafka's JVM."""
    probes: dict[str, Callable[[], float]] = {}
    pids: dict[str, list[int]] = {}
    for inst in devstack.instances_on_disk(p):
        pid = devstack.running_pid(inst.pidfile(p), inst.marker)
        if pid is not None:
            pids.setdefault(inst.service.name, []).append(pid)
    for name, of in pids.items():
        probes[name] = lambda of=of: sum(cpu_s(pid) for pid in of)
    pg_pidfile = devstack.pg_home(p) / "data" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError):
        postmaster = int(pg_pidfile.read_text().split()[0])
        probes["postgresql"] = lambda: postgres_cpu_s(postmaster)
    kafka = devstack.running_pid(
        p.root / "kafka" / "kafka.pid", str(p.root / "kafka" / "server.properties")
    )
    if kafka is not None:
        probes["kafka"] = lambda: cpu_s(kafka)
    return probes


def snapshot(probes: dict[str, Callable[[], float]]) -> dict[str, float]:
    return {name: probe() for name, probe in probes.items()}


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before if name in after}


def per_event_ms(delta: dict[str, float], events: int) -> dict[str, float]:
    out = {name: round(1000 * s / events, 3) for name, s in delta.items()} if events else {}
    out["total"] = round(sum(out.values()), 3)
    return out


# --------------------------------------------------------------------- (a) kafka chain


async def _hop(bootstrap: str, src: str, dst: str) -> None:
    """One hop of the chain: consume ``src``, produce each record to ``dst`` (acks=all,
    idempotent, batched), commit after the batch is acknowledged."""
    consumer = AIOKafkaConsumer(
        src,
        **client_options(bootstrap),
        group_id=f"{src}.hop",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(
        **client_options(bootstrap), acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    await consumer.start()
    ready = False
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=1000)
            if not ready and consumer.assignment():
                print("ready", flush=True)
                ready = True
            sent = [
                await producer.send(dst, m.value, key=m.key)
                for msgs in batch.values()
                for m in msgs
            ]
            if sent:
                await asyncio.gather(*sent)
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(**client_options(bootstrap), request_timeout_ms=30000)
    await admin.start()
    return admin


async def kafka_chain(bootstrap: str, kafka_probe: Callable[[], float] | None) -> dict[str, Any]:
    n = mode(quick=3000, full=20000)
    run = uuid.uuid4().hex[:8]
    topics = [f"bench.chain.{run}.{i}" for i in range(HOPS + 1)]
    admin = await _admin(bootstrap)
    await admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics])
    hops: list[subprocess.Popen[str]] = []
    try:
        for src, dst in itertools.pairwise(topics):
            hops.append(
                subprocess.Popen(  # noqa: ASYNC220 (starting, not waiting)
                    [sys.executable, "-m", "benchmarks.saga", "hop", bootstrap, src, dst],
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=devstack.REPO,
                )
            )
        for proc in hops:  # each has its partitions
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError("a hop of the kafka chain did not start")
        sink = AIOKafkaConsumer(**client_options(bootstrap), enable_auto_commit=False)
        await sink.start()
        tps = [TopicPartition(topics[-1], i) for i in range(PARTITIONS)]
        sink.assign(tps)
        await sink.seek_to_beginning(*tps)
        value = order_placed("ord_0000000000000000", "pi_0000000000000000", [(SKUS[0], 1, AMOUNT)])
        probes = {f"hop{i}": (lambda pid=p.pid: cpu_s(pid)) for i, p in enumerate(hops)}
        if kafka_probe:
            probes["kafka"] = kafka_probe
        before = snapshot(probes)
        started = time.monotonic()
        producer = AIOKafkaProducer(
            **client_options(bootstrap), acks="all", enable_idempotence=True, linger_ms=5
        )
        await producer.start()
        try:
            sent = [
                await producer.send(topics[0], value, key=f"ord_{i % 1000:04d}".encode())
                for i in range(n)
            ]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
        got, deadline = 0, time.monotonic() + mode(quick=60, full=180)
        while got < n and time.monotonic() < deadline:
            batch = await sink.getmany(timeout_ms=200)
            got += sum(len(v) for v in batch.values())
        elapsed = time.monotonic() - started
        delta = cpu_delta(before, snapshot(probes))
        await sink.stop()
    finally:
        for proc in hops:
            proc.terminate()
        for proc in hops:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        with contextlib.suppress(Exception):
            await admin.delete_topics(topics)
        await admin.close()
    events = got * HOPS
    split = {
        "hops": sum(v for k, v in delta.items() if k.startswith("hop")),
        "kafka": delta.get("kafka", 0.0),
    }
    return {
        "hops": HOPS,
        "records": n,
        "arrived": got,
        "record_bytes": len(value),
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed, 1),
        "orders_per_s": round(got / elapsed, 1),
        "cpu_ms_per_event": per_event_ms(split, events),
    }


# ------------------------------------------------------------------- (b) psycopg step

_PG_SETUP = """
DROP TABLE IF EXISTS bench_inbox, bench_state, bench_outbox, bench_positions;
CREATE TABLE bench_inbox (consumer_group text, dedupe_key text,
  received_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer_group, dedupe_key));
CREATE TABLE bench_state (order_id text PRIMARY KEY, version int NOT NULL, doc jsonb NOT NULL);
CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, topic text NOT NULL, key bytea,
  value bytea NOT NULL, headers jsonb NOT NULL DEFAULT '[]',
  created_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz);
CREATE INDEX ON bench_outbox (id) WHERE sent_at IS NULL;
CREATE TABLE bench_positions (consumer_group text, topic text, partition int,
  next_offset bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (consumer_group, topic, partition));
"""


async def _pg_worker(conninfo: str, worker: int, until: float, value: bytes) -> int:
    """One consumer's transactions, one after another, until ``until``."""
    group = f"bench-{worker}"
    doc = json.dumps({"status": "PENDING_PAYMENT", "value": value.decode()})
    done = 0
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SET synchronous_commit = on")
        while time.monotonic() < until:
            order = f"ord-{worker}-{done % 200}"
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO bench_inbox (consumer_group, dedupe_key) VALUES (%s, %s)",
                    (group, uuid.uuid4().hex),
                )
                await conn.execute(
                    "INSERT INTO bench_state VALUES (%s, 1, %s) ON CONFLICT (order_id) DO "
                    "UPDATE SET version = bench_state.version + 1, doc = excluded.doc",
                    (order, doc),
                )
                await conn.execute(
                    "INSERT INTO bench_outbox (topic, key, value) VALUES (%s, %s, %s)",
                    (PAYMENTS_TOPIC, order.encode(), value),
                )
                await conn.execute(
                    "INSERT INTO bench_positions (consumer_group, topic, partition, next_offset)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (consumer_group, topic, partition)"
                    " DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()",
                    (group, PAYMENTS_TOPIC, done % PARTITIONS, done),
                )
            done += 1
    return done


async def psycopg_step(server_url: str, pg_probe: Callable[[], float] | None) -> dict[str, Any]:
    devstack.ensure_databases(server_url, ("paysaga_bench",))
    conninfo = libpq_conninfo(database_url_of(server_url, "paysaga_bench"))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(_PG_SETUP)
    concurrency = len(SERVICES)  # each consuming service applies one record at a time
    seconds = mode(quick=5, full=15)
    value = order_placed("ord_0000000000000000", "pi_0000000000000000", [(SKUS[0], 1, AMOUNT)])
    probes: dict[str, Callable[[], float]] = {"client": lambda: cpu_s(os.getpid())}
    if pg_probe:
        probes["postgresql"] = pg_probe
    before = snapshot(probes)
    started = time.monotonic()
    counts = await asyncio.gather(
        *(_pg_worker(conninfo, w, started + seconds, value) for w in range(concurrency))
    )
    elapsed = time.monotonic() - started
    delta = cpu_delta(before, snapshot(probes))
    events = sum(counts)
    return {
        "concurrency": concurrency,
        "synchronous_commit": "on",
        "statements_per_transaction": 4,
        "transactions": events,
        "seconds": round(elapsed, 3),
        "events_per_s": round(events / elapsed, 1),
        "orders_per_s": None,  # events/s ÷ transactions per order, once the saga counted them
        "cpu_ms_per_event": per_event_ms(delta, events),
    }


# ------------------------------------------------------------------------------ saga


class Collector:
    """Reads every tracked topic from its end at start, keeping for each bench order the
    timestamp of the first record of each label (event type; status on
    orders.status.v1; ``confirmation`` on gateway.confirmations.v1) and record counts."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.orders: dict[str, dict[str, int]] = {}
        self.counts: dict[str, Counter[str]] = {}
        self.sizes: Counter[str] = Counter()
        self.task: asyncio.Task[None] | None = None

    def track(self, order_ids: list[str]) -> None:
        for o in order_ids:
            self.orders[o] = {}
            self.counts[o] = Counter()

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            **client_options(self.bootstrap),
            enable_auto_commit=False,
            max_partition_fetch_bytes=1 << 20,
        )
        await self.consumer.start()
        tps = [TopicPartition(t, i) for t in TRACKED for i in range(PARTITIONS)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, not at the first poll
            await self.consumer.position(tp)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            for tp, msgs in batch.items():
                for m in msgs:
                    key = m.key.decode() if m.key else ""
                    seen = self.orders.get(key)
                    if seen is None:
                        continue
                    self.counts[key][tp.topic] += 1
                    self.sizes[tp.topic] += len(m.value)
                    label = _label(tp.topic, m.value)
                    seen.setdefault(label, m.timestamp)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.consumer.stop()


def _label(topic: str, value: bytes) -> str:
    if topic == CONFIRMATIONS_TOPIC:
        return "confirmation"
    doc = json.loads(value)
    if topic == STATUS_TOPIC:
        return str(doc["payload"]["status"])
    if doc.get("event_type") in ("PaymentCaptured", "SaleConfirmed"):
        return "captured"
    return str(doc.get("event_type"))


class Saga:
    def __init__(self, env: dict[str, str], probes: dict[str, Callable[[], float]]) -> None:
        self.env, self.probes = env, probes
        self.bootstrap = env["PAYSAGA_KAFKA_BOOTSTRAP_SERVERS"]
        self.secret = json.loads(env["PAYSAGA_GATEWAY_SECRETS"])[GATEWAY][0]
        self.sim = f"http://127.0.0.1:{env['PAYSAGA_GATEWAYSIM_PORT']}"
        self.collector = Collector(self.bootstrap)

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            **client_options(self.bootstrap), acks="all", enable_idempotence=True
        )
        await self.producer.start()
        await self.collector.start()
        stock = [
            (s.encode(), envelope("StockLevelSet", {"sku": s, "available": 10**9})) for s in SKUS
        ]
        await asyncio.gather(*[await self.producer.send(CATALOG_TOPIC, v, key=k) for k, v in stock])

    async def stop(self) -> None:
        await self.collector.stop()
        await self.producer.stop()

    async def sim_payments(self, orders: list[tuple[str, str, str]]) -> dict[str, bytes]:
        """Create each payment on the simulator (not delivered): its webhook body."""
        bodies: dict[str, bytes] = {}
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=self.sim, timeout=30) as http:

            async def one(order: str, intent: str, how: str) -> None:
                async with limit:
                    r = await http.post(
                        "/sim/payments",
                        json={
                            "order_id": order,
                            "payment_intent_id": intent,
                            "amount": AMOUNT,
                            "currency": "EUR",
                            "mode": how,
                            "deliver": False,
                        },
                    )
                    r.raise_for_status()
                    bodies[order] = r.json()["body"].encode()

            await asyncio.gather(*(one(*o) for o in orders))
        return bodies

    async def step(
        self, rate: float, seconds: float, drain_s: float, profile: tuple[int, float] | None = None
    ) -> dict[str, Any]:
        """Offer ``rate`` orders/s for ``seconds``, wait up to ``drain_s`` for the last
        ones, and measure. ``profile``: (pid, seconds) to sample with py-spy meanwhile."""
        n = max(1, round(rate * seconds))
        run = uuid.uuid4().hex[:6]
        orders = [
            (
                f"bench_{run}_{i:05d}",
                f"pi_bench_{run}_{i:05d}",
                "sale" if i % SALE_EVERY == SALE_EVERY - 1 else "authorize",
            )
            for i in range(n)
        ]
        bodies = await self.sim_payments(orders)
        ids = [o for o, _, _ in orders]
        self.collector.track(ids)
        schedule = sorted(
            [(i / rate, "order", orders[i]) for i in range(n)]
            + [(i / rate + CONFIRM_AFTER_S, "confirm", orders[i]) for i in range(n)]
        )
        spy = _start_pyspy(*profile) if profile else None
        before = snapshot(self.probes)
        t0 = time.monotonic()
        backlog: list[tuple[float, float]] = []
        confirmed = 0
        sent = []
        for due, what, (order, intent, _how) in schedule:
            delay = t0 + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if what == "order":
                value = order_placed(order, intent, [(SKUS[hash(order) % len(SKUS)], 1, AMOUNT)])
                sent.append(
                    await self.producer.send(CHECKOUT_ORDERS_TOPIC, value, key=order.encode())
                )
            else:
                body = bodies[order]
                headers = [
                    ("paysaga-gateway", GATEWAY.encode()),
                    ("paysaga-signature", sign(self.secret, int(time.time()), body).encode()),
                ]
                sent.append(
                    await self.producer.send(
                        CONFIRMATIONS_TOPIC, body, key=order.encode(), headers=headers
                    )
                )
                confirmed += 1
            if not backlog or time.monotonic() - t0 - backlog[-1][0] >= 0.5:
                done = sum(1 for o in ids if "PAID_CONFIRMED" in self.collector.orders[o])
                backlog.append((time.monotonic() - t0, confirmed - done))
        await asyncio.gather(*sent)
        offered_until = time.monotonic()
        while time.monotonic() < offered_until + drain_s:
            if all(FINAL & self.collector.orders[o].keys() for o in ids):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # the last relayed records of the finished orders
        delta = cpu_delta(before, snapshot(self.probes))
        top = await _stop_pyspy(spy) if spy else None
        return self._measure(rate, seconds, ids, backlog, delta, top)

    def _measure(
        self,
        rate: float,
        seconds: float,
        ids: list[str],
        backlog: list[tuple[float, float]],
        delta: dict[str, float],
        top: dict[str, Any] | None,
    ) -> dict[str, Any]:
        seen = [self.collector.orders[o] for o in ids]
        paid = [s for s in seen if "PAID_CONFIRMED" in s and "confirmation" in s]
        e2e = [s["PAID_CONFIRMED"] - s["confirmation"] for s in paid]
        steps = {
            name: stats.summary([s[b] - s[a] for s in paid if a in s and b in s])
            for name, a, b in STEPS
        }
        first = min((s["confirmation"] for s in seen if "confirmation" in s), default=0)
        in_window = sum(1 for s in paid if s["PAID_CONFIRMED"] <= first + seconds * 1000)
        growing = stats.lag_growing(backlog, rate)
        e2e_summary = stats.summary(e2e)
        sustained, _ = stats.verdict(len(ids), len(paid), growing, e2e_summary["p99"])
        outcomes = Counter(next((f for f in FINAL if f in s), "unfinished") for s in seen)
        records: Counter[str] = Counter()
        for o in ids:
            records.update(self.collector.counts[o])
        return {
            "offered_per_s": rate,
            "seconds": seconds,
            "orders": len(ids),
            "completed": len(paid),
            "outcomes": dict(outcomes),
            "achieved_per_s": round(in_window / seconds, 2),
            "sustained": sustained,
            "lag_growing": growing,
            "backlog_max": max((b for _, b in backlog), default=0),
            "end_to_end_ms": e2e_summary,
            "steps_ms": steps,
            "cpu_ms_per_order": per_event_ms(delta, len(paid)),
            "cpu_utilisation": {k: round(v / seconds, 3) for k, v in delta.items()},
            "records_per_order": {t: round(c / len(ids), 2) for t, c in sorted(records.items())},
            **({"profile": top} if top else {}),
        }


def consumes_per_order(records_per_order: dict[str, float]) -> float:
    """Records the services consume per order: each topic's records times its consuming
    services (topics.yaml)."""
    doc = yaml.safe_load(TOPICS_FILE.read_text())["topics"]
    return sum(
        n * len(set(doc.get(t, {}).get("consumers", [])) & set(SERVICES))
        for t, n in records_per_order.items()
    )


# --------------------------------------------------------------------------- py-spy


def _pyspy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _start_pyspy(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], Path, int] | None:
    exe = _pyspy()
    if exe is None:
        return None
    out = RESULTS / f".pyspy-{pid}.txt"
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--nonblocking",
            "-d",
            str(int(seconds)),
            "-f",
            "raw",
            "-o",
            str(out),
            "--pid",
            str(pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, out, pid


async def _stop_pyspy(spy: tuple[subprocess.Popen[bytes], Path, int] | None) -> dict[str, Any]:
    if spy is None:
        return {"error": "py-spy not installed"}
    proc, out, pid = spy
    try:
        await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
    except TimeoutError:
        proc.kill()
    try:
        text = out.read_text()
    except OSError:
        return {"error": f"py-spy wrote nothing (exit {proc.returncode}; needs ptrace)"}
    finally:
        out.unlink(missing_ok=True)
    return {"pid": pid, **top_costs(text)}


_LINE = re.compile(r":\d+\)$")
#: frames every sample passes through (the event loop, the service's main): left out of
#: the inclusive list, where they would fill the top with 100 %
_OUTER = re.compile(r"\((asyncio/|<frozen )|^(main|<module>|run_service) \(")


def top_costs(raw: str, n: int = 12) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks → the top functions by own samples and by
    inclusive samples (percent of all samples)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for f in set(frames) - set(filter(_OUTER.search, frames)):
            inclusive[f] += int(count)

    def top(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(100 * k / total, 1)] for f, k in c.most_common(n)] if total else []

    return {"samples": total, "own_pct": top(own), "inclusive_pct": top(inclusive)}


# --------------------------------------------------------------------------- bridge


async def bridge_ingest(saga: Saga, probes: dict[str, Callable[[], float]]) -> dict[str, Any]:
    n = mode(quick=200, full=2000)
    concurrency = 16
    run = uuid.uuid4().hex[:6]
    orders = [
        (f"benchwh_{run}_{i:05d}", f"pi_benchwh_{run}_{i:05d}", "authorize") for i in range(n)
    ]
    bodies = list((await saga.sim_payments(orders)).values())
    url = f"http://127.0.0.1:{saga.env['PAYSAGA_BRIDGE_PORT']}/webhooks/{GATEWAY}"
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    limit = asyncio.Semaphore(concurrency)
    keep = {k: probes[k] for k in ("bridge", "kafka") if k in probes}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as h:

        async def post(body: bytes) -> None:
            async with limit:
                headers = {
                    "paysaga-signature": sign(saga.secret, int(time.time()), body),
                    "content-type": "application/json",
                }
                t = time.monotonic()
                r = await h.post(url, content=body, headers=headers)
                latencies.append(1000 * (time.monotonic() - t))
                statuses[r.status_code] += 1

        before = snapshot(keep)
        started = time.monotonic()
        await asyncio.gather(*(post(b) for b in bodies))
        elapsed = time.monotonic() - started
    delta = cpu_delta(before, snapshot(keep))
    return {
        "webhooks": n,
        "concurrency": concurrency,
        "statuses": {str(k): v for k, v in statuses.items()},
        "seconds": round(elapsed, 3),
        "webhooks_per_s": round(n / elapsed, 1),
        "latency_ms": stats.summary(latencies),
        "cpu_ms_per_webhook": per_event_ms(delta, n),
    }


# ----------------------------------------------------------------------------- main


async def groups_settled(bootstrap: str, instances: int) -> None:
    """Wait until the consumer group of each service that scales out is stable with
    ``instances`` members, every one of them with partitions assigned: the first step
    must not pay for members still joining (a rebalance). A poll with a deadline."""
    groups = {f"paysaga.{sp.name}" for sp in devstack.SERVICE_PROCESSES if sp.scales_out}
    admin = await _admin(bootstrap)
    try:
        deadline = time.monotonic() + GROUPS_SETTLE_S
        while True:
            seen: dict[str, tuple[int, str, list[int]]] = {}
            for group in sorted(groups):
                # one group a request: aiokafka (0.14) reads DescribeGroups v3 answers
                # with v2's layout, which lacks each group's trailing authorized
                # operations, so a second group in one answer would be misread
                (response,) = await admin.describe_consumer_groups([group])
                # (error_code, group, state, protocol_type, protocol, members, …); a
                # member: (member_id, client_id, client_host, metadata, assignment)
                for g in response.get_item("groups"):
                    seen[g[1]] = (g[0], g[2], [_assigned(m[4]) for m in g[5]])
            waiting = {
                g: seen.get(g) for g in groups if not stats.group_settled(seen.get(g), instances)
            }
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise devstack.StackError(
                    f"consumer groups not settled with {instances} member(s) each within "
                    f"{GROUPS_SETTLE_S:.0f}s: {waiting} (error, state, partitions per member)"
                )
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def monitor_ready(p: devstack.Profile) -> None:
    """Wait until the monitor is ready (``/readyz``: its table recovered from the
    changelog): a restarted monitor reads every order of the stack's last day back, and
    the idle reading and the first steps must not pay for it. A poll with a deadline."""
    monitor = next(sp for sp in devstack.SERVICE_PROCESSES if sp.name == "monitor")
    url = f"http://127.0.0.1:{service_port(p, monitor)}/readyz"
    ready = functools.partial(devstack.answers, url)
    devstack.wait_until("monitor recovered", ready, lambda: True, timeout=MONITOR_READY_S)


def _assigned(member_assignment: bytes) -> int:
    """Partitions in a group member's assignment (0 before the group assigned any)."""
    if not member_assignment:
        return 0
    return len(ConsumerProtocolMemberAssignment.decode(member_assignment).partitions())


async def saga_ladder(
    env: dict[str, str],
    probes: dict[str, Callable[[], float]],
    p99_limit: float,
    instances: int,
    with_bridge: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The open-loop ladder on a stack of ``instances`` of each service that scales out;
    the bridge's ingest after it when ``with_bridge`` (one bridge either way)."""
    saga = Saga(env, probes)
    await saga.start()
    bridge = None
    try:
        seconds, drain = mode(quick=10, full=30), mode(quick=10, full=20)
        idle_s = mode(quick=3, full=5)
        before = snapshot(probes)
        await asyncio.sleep(idle_s)
        idle = {k: round(v / idle_s, 3) for k, v in cpu_delta(before, snapshot(probes)).items()}
        warm = await saga.step(2, mode(quick=4, full=8), drain)
        if not warm["completed"]:
            raise RuntimeError(f"the warm-up orders did not complete: {warm['outcomes']}")
        rates = stats.rate_ladder(ARGS.start_rate, mode(quick=2, full=1.5), mode(quick=2, full=12))
        budget = time.monotonic() + mode(quick=50, full=360)
        steps: list[dict[str, Any]] = []
        for rate in rates:
            if time.monotonic() > budget:
                break
            console.print(f"saga ({instances} instance(s)): {rate:g} orders/s for {seconds}s …")
            step = await saga.step(rate, seconds, drain)
            steps.append(step)
            e = step["end_to_end_ms"]
            console.print(
                f"  achieved {step['achieved_per_s']}/s, p50 {e['p50']} p99 {e['p99']}"
                f" ms, sustained {step['sustained']}"
            )
            if stats.verdict(
                step["orders"], step["completed"], step["lag_growing"], e["p99"], p99_limit
            )[1]:
                break
        # py-spy on the busiest service at the best sustained rate (else the first)
        best = stats.best_rates(steps, p99_limit)["sustained_per_s"] or rates[0]
        ref = next(s for s in steps if s["offered_per_s"] == best) if steps else warm
        services = {
            k: v
            for k, v in ref["cpu_ms_per_order"].items()
            if k not in ("postgresql", "kafka", "total")
        }
        busiest = max(services, key=lambda k: services[k]) if services else "orders"
        profile: dict[str, Any] = {"service": busiest, "offered_per_s": best}
        first = devstack.ServiceInstance(
            next(sp for sp in devstack.SERVICE_PROCESSES if sp.name == busiest)
        )  # its first instance, when there are several
        pid = devstack.running_pid(first.pidfile(devstack.PROFILES[PROFILE]), first.marker)
        if _pyspy() and pid:
            spy_s = mode(quick=6, full=20)
            console.print(f"py-spy: {busiest} (pid {pid}) at {best:g} orders/s for {spy_s}s …")
            step = await saga.step(best, spy_s + 2, drain, profile=(pid, spy_s))
            profile |= step.get("profile", {})
        else:
            profile["error"] = "py-spy not installed (pip install py-spy)"
        if with_bridge:
            console.print("bridge ingest …")
            bridge = await bridge_ingest(saga, probes)
    finally:
        await saga.stop()
    ladder = {
        "instances": instances,
        "idle_utilisation": idle,
        "warmup": warm,
        "steps": steps,
        "profile": profile,
    }
    return ladder | stats.best_rates(steps, p99_limit), bridge


def run(p99_limit: float, instances: list[int]) -> dict[str, Any]:
    """The limits, then one saga ladder per entry of ``instances`` (the services
    restarted with that many instances of each; Kafka and PostgreSQL stay up)."""
    p = devstack.PROFILES[PROFILE]
    env = devstack.infra_up(p)
    bootstrap = env["PAYSAGA_KAFKA_BOOTSTRAP_SERVERS"]

    def services(n: int) -> dict[str, Callable[[], float]]:
        devstack.services_down(p)  # none left from the last ladder (or a --keep-up run)
        devstack.services_up(p, env, n)
        asyncio.run(groups_settled(bootstrap, n))
        monitor_ready(p)
        probes = stack_processes(p)
        console.print(
            f"stack '{PROFILE}' up, {n} instance(s) of each service, groups settled, "
            "the monitor's table recovered; "
            f"processes measured: {', '.join(probes)}"
        )
        return probes

    probes = services(instances[0])
    console.print("limit (a): raw aiokafka chain …")
    chain = asyncio.run(kafka_chain(bootstrap, probes.get("kafka")))
    console.print("limit (b): raw psycopg step transactions …")
    pg = asyncio.run(psycopg_step(env["PAYSAGA_DATABASE_URL"], probes.get("postgresql")))
    ladders: list[dict[str, Any]] = []
    bridge: dict[str, Any] | None = None
    for i, n in enumerate(instances):
        if i:
            probes = services(n)
        ladder, got = asyncio.run(saga_ladder(env, probes, p99_limit, n, bridge is None))
        bridge = bridge or got
        ref = next(
            (s for s in ladder["steps"] if s["offered_per_s"] == ladder["sustained_per_s"]), None
        )
        ladder["consumes_per_order"] = consumes_per_order(
            (ref or ladder["warmup"])["records_per_order"]
        )
        ladders.append(ladder)
    consumes = ladders[0]["consumes_per_order"]
    if consumes:
        pg["orders_per_s"] = round(pg["events_per_s"] / consumes, 1)
    limits = {"kafka_chain": chain, "psycopg_step": pg}
    for ladder in ladders:
        ladder["ratios"] = stats.ratios(
            ladder["sustained_per_s"], {k: v["orders_per_s"] for k, v in limits.items()}
        )
    return {
        "benchmark": "saga",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": ARGS.quick,
        "p99_limit_ms": p99_limit,
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "limits": limits,
        "saga": ladders,
        "bridge": bridge,
    }


def _of(n: int) -> str:
    return f"{n} instance{'s' if n > 1 else ''} of each service"


def print_table(doc: dict[str, Any]) -> None:
    lim = doc["limits"]
    t = Table("limit", "events/s", "orders/s", "CPU ms/event", title="limits (same run)")
    for name, label in (
        ("kafka_chain", f"aiokafka chain, {HOPS} hops"),
        ("psycopg_step", "psycopg step transaction"),
    ):
        x = lim[name]
        t.add_row(
            label,
            f"{x['events_per_s']:g}",
            f"{x['orders_per_s'] or '-'}",
            f"{x['cpu_ms_per_event']['total']:g}",
        )
    console.print(t)
    for ladder in doc["saga"]:
        _print_ladder(ladder)
    t = Table(
        "instances",
        "sustained/s",
        f"within p99 {doc['p99_limit_ms']:g} ms",
        "p50 / p99 ms there",
        "CPU ms/order there",
        "ratios to the limits",
        title="highest sustained rate, by instances of each service",
    )
    for ladder in doc["saga"]:
        ref = _best_step(ladder)
        e = ref["end_to_end_ms"] if ref else {}
        t.add_row(
            f"{ladder['instances']}",
            f"{ladder['sustained_per_s']}",
            f"{ladder['sustained_p99_within_limit_per_s']}",
            f"{e.get('p50')} / {e.get('p99')}",
            f"{ref['cpu_ms_per_order']['total']:g}" if ref else "-",
            ", ".join(f"{k} {v}" for k, v in ladder["ratios"].items()),
        )
    console.print(t)
    b = doc["bridge"]
    console.print(
        f"bridge ingest: {b['webhooks_per_s']} webhooks/s, p50 {b['latency_ms']['p50']} ms,"
        f" p99 {b['latency_ms']['p99']} ms (concurrency {b['concurrency']}, {b['statuses']})"
    )
    for ladder in doc["saga"]:
        prof = ladder["profile"]
        for f, pct in prof.get("own_pct", [])[:8]:
            console.print(
                f"  py-spy {prof['service']} ({_of(ladder['instances'])}): {pct:5.1f}% own  {f}"
            )


def _best_step(ladder: dict[str, Any]) -> dict[str, Any] | None:
    return next(
        (s for s in ladder["steps"] if s["offered_per_s"] == ladder["sustained_per_s"]), None
    )


def _print_ladder(ladder: dict[str, Any]) -> None:
    """One ladder's steps (CPU by process: each service's instances summed) and its
    per-step latencies at the highest sustained rate."""
    t = Table(
        "offered/s",
        "achieved/s",
        "done",
        "p50",
        "p95",
        "p99 ms",
        "sustained",
        "CPU ms/order",
        "by process (ms/order)",
        title=f"saga, open loop, {_of(ladder['instances'])}",
    )
    for s in ladder["steps"]:
        e, cpu = s["end_to_end_ms"], s["cpu_ms_per_order"]
        split = " ".join(
            f"{k} {v:g}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if k != "total"
        )
        t.add_row(
            f"{s['offered_per_s']:g}",
            f"{s['achieved_per_s']:g}",
            f"{s['completed']}/{s['orders']}",
            f"{e['p50']}",
            f"{e['p95']}",
            f"{e['p99']}",
            "yes" if s["sustained"] else "no",
            f"{cpu['total']:g}",
            split,
        )
    console.print(t)
    ref = _best_step(ladder)
    if ref:
        t = Table(
            "step",
            "p50",
            "p95",
            "p99 ms",
            title=f"per step at {ref['offered_per_s']:g}/s ({ladder['instances']} inst.)",
        )
        for name, x in ref["steps_ms"].items():
            t.add_row(name, f"{x['p50']}", f"{x['p95']}", f"{x['p99']}")
        console.print(t)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput and latency against the offered rate: one series per ladder (1
    instance of each service: solid; more: dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = 1.0
    for ladder in doc["saga"]:
        steps, n = ladder["steps"], ladder["instances"]
        offered = [s["offered_per_s"] for s in steps]
        top = max(top, *offered)
        style = "o-" if n == 1 else "s--"
        a.plot(offered, [s["achieved_per_s"] for s in steps], style, label=f"saga, {n} inst.")
        for q, color in (("p50", "C0"), ("p95", "C1"), ("p99", "C2")):
            b.plot(
                offered,
                [s["end_to_end_ms"][q] for s in steps],
                style,
                color=color,
                label=f"{q}, {n} inst.",
            )
    a.plot([0, top], [0, top], ":", color="grey", label="offered")
    for name, style in (("kafka_chain", "--"), ("psycopg_step", "-.")):
        limit = doc["limits"][name]["orders_per_s"]
        if limit and limit < 20 * top:
            a.axhline(limit, ls=style, color="grey", label=f"{name} limit")
    chain, pg = (doc["limits"][k]["orders_per_s"] for k in ("kafka_chain", "psycopg_step"))
    a.set(
        xlabel="offered orders/s",
        ylabel="completed orders/s",
        title=f"throughput (limits: kafka chain {chain}/s, psycopg {pg}/s)",
    )
    a.legend(fontsize=8)
    b.axhline(doc["p99_limit_ms"], ls="--", color="red", label="p99 limit")
    b.set(
        xlabel="offered orders/s",
        ylabel="ms (confirmation → PAID_CONFIRMED)",
        title="end-to-end latency",
        yscale="log",
    )
    b.legend(fontsize=8)
    fig.suptitle(f"paysaga saga benchmark {doc['date']} (nproc {doc['machine']['nproc']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    if sys.argv[1:2] == ["hop"]:
        asyncio.run(_hop(*sys.argv[2:5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument(
        "--p99-ms",
        type=float,
        default=stats.P99_LIMIT_MS,
        help="stop the ladder after a step whose p99 passes this",
    )
    parser.add_argument("--start-rate", type=float, default=2.0, help="the first step's orders/s")
    parser.add_argument(
        "--instances",
        type=int,
        nargs="+",
        metavar="N",
        help="one saga ladder per N, with N instances of each consuming service"
        " (default: 1 2; with --quick: 1)",
    )
    parser.add_argument("--keep-up", action="store_true", help="leave the bench stack running")
    global ARGS
    ARGS = parser.parse_args()
    ARGS.instances = ARGS.instances or mode(quick=[1], full=[1, 2])
    for n in ARGS.instances:
        try:
            devstack.service_instances(n)
        except ValueError as exc:
            parser.error(str(exc))
    started = time.monotonic()
    try:
        doc = run(ARGS.p99_ms, ARGS.instances)
    except devstack.StackError as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(1)
    finally:
        if not ARGS.keep_up:
            devstack.down(PROFILE)
    stats.check_result(doc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = {p.stem for p in RESULTS.glob("*.json")}
    stem = stats.free_stem(saved, datetime.now(UTC).strftime("%Y-%m-%d"), ARGS.quick)
    (RESULTS / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print_table(doc)
    try:
        plot(doc, RESULTS / f"{stem}.png")
        console.print(f"saved {RESULTS / stem}.json and .png ({time.monotonic() - started:.0f}s)")
    except ImportError:
        console.print(f"saved {RESULTS / stem}.json; no plot: pip install -e '.[bench]'")


if __name__ == "__main__":
    main()
