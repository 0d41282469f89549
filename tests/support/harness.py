"""Test plumbing: real processes, real topics, polling with deadlines (never sleeps)."""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.devclient import envelope, produce, read_all, wait_for
from services.runtime.topics import partitions_of

__all__ = ["envelope", "produce", "read_all", "wait_for"]

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / ".local" / "test" / "logs"
T = TypeVar("T")


def uid(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query(conninfo: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


async def create_topic(
    bootstrap: str, name: str, partitions: int = 3, configs: dict[str, str] | None = None
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs or {})])
    finally:
        await admin.close()


class Proc:
    """A service as a real child process: started, killed, restarted like in production."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name, self.argv = name, argv
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen[bytes] | None = None
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = LOGS / f"{name}.log"

    def start(self, **env: str) -> Proc:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.argv],
            env={**self.env, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_messages(self) -> str:
        """The ``msg`` of each JSON log line (services.runtime.logs), one a line; lines
        that are not JSON as they are."""
        out = []
        for line in self.log_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            out.append(str(doc["msg"]) if isinstance(doc, dict) and "msg" in doc else line)
        return "\n".join(out)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def assignments(self) -> list[list[str]]:
        """Every assignment of this process so far, from its log (the runtime logs
        ``<group> assigned [...]`` on every rebalance), of the topics it consumes."""
        found = re.findall(r" assigned (\[.*\])$", self.log_messages(), flags=re.MULTILINE)
        # the group's own .dlq topic (its replay/purge control channel) is left out
        return [
            [tp for tp in ast.literal_eval(a) if not tp.rsplit("/", 1)[0].endswith(".dlq")]
            for a in found
        ]

    def assignment(self) -> list[str] | None:
        """The partitions of this process's latest assignment; None before any."""
        found = self.assignments()
        return found[-1] if found else None


# ---------------------------------------------------------------- guarantees helpers


def credit(account: str, seq: int, **extra: object) -> tuple[str, bytes]:
    """(key, value) of a ledger ``Credit``; ``extra`` adds payload fields (sleep_s, ...)."""
    return account, envelope("Credit", {"account": account, "amount": 1, "seq": seq, **extra})


def stream(accounts: int = 12) -> Iterator[tuple[str, bytes]]:
    """An endless stream of Credits round-robin over accounts ``k0``.., seq 0, 1, 2, ...
    (seq increases per account too, so per-key order can be checked). The default 12
    keys land 3/5/4 on the partitions of a 3-partition topic, so every member of a group
    gets work (``acct0``..``acct9`` would leave partition 2 empty)."""
    for seq in itertools.count():
        yield credit(f"k{seq % accounts}", seq)


def assert_once_in_key_order(rows: list[tuple[str, int, str]], expected: set[int]) -> None:
    """Each expected seq applied exactly once, and per account in increasing seq order
    (``rows`` are (account, seq, event_id) in application order: ledger_applied.id)."""
    seqs = [seq for _, seq, _ in rows]
    assert len(seqs) == len(set(seqs)), "an event was applied twice"
    assert set(seqs) == expected, f"missing: {sorted(expected - set(seqs))[:20]}"
    per_key: dict[str, list[int]] = defaultdict(list)
    for account, seq, _ in rows:
        per_key[account].append(seq)
    for account, applied in per_key.items():
        assert applied == sorted(applied), f"{account} applied out of order: {applied}"


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> end offset (the next offset to be written) of ``topic``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await partitions_of(bootstrap, names=[topic])
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def caught_up(conninfo: str, bootstrap: str, group: str, topic: str) -> bool:
    """True once ``group``'s stored positions reached the end of every partition of
    ``topic``: everything published so far was processed (applied, deduped, parked or
    dead-lettered)."""
    ends = asyncio.run(end_offsets(bootstrap, topic))
    stored = dict(
        query(
            conninfo,
            "SELECT partition, next_offset FROM consumer_positions"
            " WHERE consumer_group = %s AND topic = %s",
            group,
            topic,
        )
    )
    return all(stored.get(p, 0) >= end for p, end in ends.items())


def published(bootstrap: str, topic: str) -> list[tuple[int, int, str | None, dict[str, Any]]]:
    """(partition, offset, key, envelope) of every enveloped record of ``topic``, in
    partition order."""
    out = [
        (m.partition, m.offset, m.key.decode() if m.key else None, json.loads(m.value))
        for m in asyncio.run(read_all(bootstrap, topic))
    ]
    return sorted(out, key=lambda r: (r[0], r[1]))


def cli(*args: str, bootstrap: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real ``paysaga`` command (the venv's console script) and require success."""
    exe = Path(sys.executable).with_name("paysaga")
    env = {**os.environ, "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "COLUMNS": "250"}
    done = subprocess.run(
        [str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert done.returncode == 0, f"paysaga {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


class Feeder(threading.Thread):
    """Produces records at a steady rate in the background until stopped (or its
    records run out): a stream that keeps flowing while a test kills, joins or stops
    things. ``sent`` counts the acknowledged records."""

    def __init__(self, bootstrap: str, topic: str, records: Iterator[tuple[str, bytes]],
                 per_second: float = 100) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.records = bootstrap, topic, records
        self.interval = 1 / per_second
        self.sent = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._feed())
        except Exception as exc:  # surfaced by finish()
            self.error = exc

    async def _feed(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=True, acks="all"
        )
        await producer.start()
        try:
            for key, value in self.records:
                if self._stop_event.is_set():
                    return
                await producer.send_and_wait(self.topic, value=value, key=key.encode())
                self.sent += 1
                # pacing, not waiting for an outcome: the stream must span the event
                await asyncio.sleep(self.interval)
        finally:
            await producer.stop()

    def finish(self) -> int:
        """Stop producing; returns how many records were sent."""
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), "feeder did not stop"
        if self.error is not None:
            raise self.error
        return self.sent
