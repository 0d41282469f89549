"""Throughput of the runtime's processing rule, end to end on real infrastructure.

``python -m benchmarks.runtime_throughput [--records N]`` pre-produces N ``Credit``
records over ~100 keys to a fresh topic, starts one ledger test service process
(tests/support/ledger_service.py: one insert per record plus one outbox row), and
measures from the moment its consumer is assigned the partitions:

(a) consume + transaction: until all N are applied in PostgreSQL (inbox, state,
    outbox and position committed per partition batch);
(b) end to end: until all N ``Credited`` events are also in the out topic (outbox →
    LISTEN/NOTIFY → relay → idempotent producer, acks=all).

Infrastructure is chosen like the tests' session fixture: explicit
``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS``/``PAYSAGA_DATABASE_URL`` if both are set, else the
local test profile (``services.devstack.infra_up``, idempotent). The benchmark uses its
own database and topics and drops the database afterwards. The result is printed and
saved to ``benchmarks/results/runtime_throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import create_engine

from services.runtime.kafka import client_options
from services.runtime.service import libpq_conninfo
from services.runtime.tables import metadata as runtime_metadata
from tests.support import ledger_service
from tests.support.harness import Proc, create_topic, envelope, free_port, uid

RESULTS = Path(__file__).resolve().parent / "results" / "runtime_throughput.json"
KEYS = 100
PARTITIONS = 6  # as every saga topic (topics.yaml defaults)


def infra() -> tuple[str, str]:
    """(bootstrap servers, server database URL) — the tests' choice, see tests/conftest.py."""
    if not (
        os.environ.get("PAYSAGA_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("PAYSAGA_DATABASE_URL")
    ):
        from services import devstack

        devstack.infra_up(devstack.PROFILES["test"])
    return os.environ["PAYSAGA_KAFKA_BOOTSTRAP_SERVERS"], os.environ["PAYSAGA_DATABASE_URL"]


async def preproduce(bootstrap: str, topic: str, n: int) -> None:
    producer = AIOKafkaProducer(
        **client_options(bootstrap), enable_idempotence=True, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        futures = []
        for i in range(n):
            account = f"acct{i % KEYS}"
            value = envelope("Credit", {"account": account, "amount": 1, "seq": i})
            futures.append(await producer.send(topic, value=value, key=account.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def measure(proc: Proc, bootstrap: str, conninfo: str, out_topic: str, n: int,
                  timeout_s: float) -> dict[str, float]:  # fmt: skip
    """Poll (every 50 ms) until the consumer is assigned, then until N rows are applied
    and N records are in the out topic. Returns monotonic timestamps."""
    marks: dict[str, float] = {"started": time.monotonic()}
    deadline = marks["started"] + timeout_s
    consumer = AIOKafkaConsumer(**client_options(bootstrap), enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(out_topic, p) for p in range(PARTITIONS)]
    try:
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            while "out" not in marks:
                now = time.monotonic()
                if now > deadline or not proc.alive:
                    raise RuntimeError(
                        f"no result after {now - marks['started']:.0f}s; see {proc.log}"
                    )
                if "assigned" not in marks:
                    if proc.assignment():
                        marks["assigned"] = now
                elif "applied" not in marks:
                    cur = await conn.execute("SELECT count(*) FROM ledger_applied")
                    row = await cur.fetchone()
                    if row is not None and row[0] >= n:
                        marks["applied"] = now
                if "assigned" in marks and sum((await consumer.end_offsets(tps)).values()) >= n:
                    marks["out"] = now
                    marks.setdefault("applied", now)
                await asyncio.sleep(0.05)  # the measurement's resolution, light on 2 cores
    finally:
        await consumer.stop()
    return marks


def run(n: int, timeout_s: float) -> dict[str, Any]:
    bootstrap, server_url = infra()
    t = uid("b")
    dbname, in_topic, out_topic, group = (
        f"paysaga_bench_{t}",
        f"bench.in.{t}",
        f"bench.out.{t}",
        f"paysaga.bench-{t}",
    )
    db_url = f"{server_url.rstrip('/')}/{dbname}"
    admin = libpq_conninfo(f"{server_url.rstrip('/')}/postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    proc: Proc | None = None
    try:
        engine = create_engine(db_url)
        runtime_metadata.create_all(engine)
        ledger_service.metadata.create_all(engine)
        engine.dispose()
        for topic in (in_topic, out_topic, f"{group}.dlq"):
            asyncio.run(create_topic(bootstrap, topic, PARTITIONS))
        produced = time.monotonic()
        asyncio.run(preproduce(bootstrap, in_topic, n))
        print(f"pre-produced {n} records over {KEYS} keys in {time.monotonic() - produced:.1f}s")

        argv = ["-m", "tests.support.ledger_service", "--in-topic", in_topic, "--group", group,
                "--db-url", db_url, "--bootstrap", bootstrap, "--port", str(free_port()),
                "--out-topic", out_topic]  # fmt: skip
        proc = Proc(f"bench-{t}", argv).start()  # INFO logs its assignment: the start mark
        marks = asyncio.run(
            measure(proc, bootstrap, libpq_conninfo(db_url), out_topic, n, timeout_s)
        )
        with psycopg.connect(libpq_conninfo(db_url), autocommit=True) as conn:
            applied, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT event_id) FROM ledger_applied"
            ).fetchone() or (0, 0)
        if applied != n or distinct != n:
            raise RuntimeError(f"expected {n} applications, found {applied} ({distinct} distinct)")
    finally:
        if proc is not None:
            proc.stop()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    consume_s = marks["applied"] - marks["assigned"]
    e2e_s = marks["out"] - marks["assigned"]
    return {
        "benchmark": "runtime_throughput",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "nproc": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "records": n,
        "keys": KEYS,
        "partitions": PARTITIONS,
        "seconds": {
            "process_start_to_assigned": round(marks["assigned"] - marks["started"], 3),
            "consume_transaction": round(consume_s, 3),
            "end_to_end": round(e2e_s, 3),
        },
        "rates_per_s": {
            "consume_transaction": round(n / consume_s, 1),
            "end_to_end": round(n / e2e_s, 1),
        },
        "notes": "one ledger process; Kafka and PostgreSQL of the local test profile on the "
        "same machine; timed from the consumer's assignment; polled every 50 ms",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=600, help="give up after (s)")
    args = parser.parse_args()
    result = run(args.records, args.timeout)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    s, r = result["seconds"], result["rates_per_s"]
    print(f"{args.records} records, nproc={result['machine']['nproc']}")
    for label, name in (("(a) consume + transaction", "consume_transaction"),
                        ("(b) end to end (relayed) ", "end_to_end")):  # fmt: skip
        print(f"{label}: {s[name]:.2f}s = {r[name]:.0f} records/s")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
