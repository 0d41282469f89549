from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import driver, migrate
from services.runtime.consumer import ConsumerRuntime, RuntimeSettings
from services.runtime.metrics import RuntimeMetrics
from services.runtime.service import make_engine
from services.runtime.tables import metadata as runtime_metadata
from tests.conftest import Infra
from tests.support import ledger_service
from tests.support.harness import Proc, create_topic, free_port, published, query, uid


def create_runtime_db(infra: Infra, dbname: str) -> str:
    """A fresh database with the runtime's tables and the ledger test service's table.

    One per test, like one per service in production: a relay publishes every unsent
    outbox row of its database and competes for that database's advisory lock, so
    tests (or engineers running the suite at the same time) sharing one database would
    publish each other's rows and steal each other's relay lock."""
    with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    engine = create_engine(infra.db_url(dbname))
    runtime_metadata.create_all(engine)
    ledger_service.metadata.create_all(engine)
    engine.dispose()
    return infra.db_url(dbname)


def refunds_db(
    infra: Infra, prefix: str
) -> contextlib.AbstractAsyncContextManager[tuple[AsyncEngine, str]]:
    """A fresh database at the refunds schema (intents, inbox, outbox)."""
    return service_db(infra, "refunds", prefix)


#: an inbox row entered on the driver's connection (``services.runtime.driver``): what
#: the tests of the connections under it write, read back by ``inbox_keys``
INBOX_INSERT = driver.sql_of(
    text("INSERT INTO inbox (consumer_group, dedupe_key) VALUES (:group, :key) RETURNING 1")
)


async def inbox_keys(engine: AsyncEngine) -> list[str]:
    """The inbox's dedupe keys, in order."""
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT dedupe_key FROM inbox ORDER BY dedupe_key"))
        return [r.dedupe_key for r in found]


@contextlib.asynccontextmanager
async def service_db(
    infra: Infra, service: str, prefix: str
) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """A fresh database at ``service``'s schema (its migrations at head): engine,
    conninfo; dropped afterwards."""
    dbname = f"paysaga_{prefix}_{uid()}"
    with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    migrate.upgrade(service, infra.db_url(dbname))
    engine = make_engine(infra.db_url(dbname))
    try:
        yield engine, infra.conninfo(dbname)
    finally:
        await engine.dispose()
        drop_db(infra, dbname)


def drop_db(infra: Infra, dbname: str) -> None:
    with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@dataclasses.dataclass
class Ledger:
    """One test's topics, group and processes of the ledger service."""

    infra: Infra
    db_url: str
    in_topic: str
    out_topic: str
    group: str
    dbname: str
    procs: list[Proc] = dataclasses.field(default_factory=list)

    @property
    def conninfo(self) -> str:
        return self.infra.conninfo(self.dbname)

    def process(
        self,
        name: str = "ledger",
        group: str | None = None,
        in_topic: str | None = None,
        out_topic: str | None = "default",
        db_url: str | None = None,
        **env: str,
    ) -> Proc:
        argv = [
            "-m",
            "tests.support.ledger_service",
            "--in-topic",
            in_topic or self.in_topic,
            "--group",
            group or self.group,
            "--db-url",
            db_url or self.db_url,
            "--bootstrap",
            self.infra.bootstrap,
            "--port",
            str(free_port()),
        ]
        out = self.out_topic if out_topic == "default" else out_topic
        if out:
            argv += ["--out-topic", out]
        proc = Proc(f"{self.group}-{name}", argv, env={"PAYSAGA_POLL_TIMEOUT_MS": "200", **env})
        self.procs.append(proc)
        return proc

    def runtime(self, settings: RuntimeSettings) -> tuple[Any, ConsumerRuntime]:
        """The ledger service's consumer in this process (no dead-letter producer, no
        outbox topic): its service (``engine`` to dispose of) and its runtime."""
        args = argparse.Namespace(group=self.group, db_url=self.db_url,
                                  bootstrap=self.infra.bootstrap, in_topic=self.in_topic,
                                  out_topic=None, port=0)  # fmt: skip
        svc = ledger_service.build(args)
        rt = ConsumerRuntime(service="ledger", group=self.group, routes=svc.routes,
                             engine=svc.engine, bootstrap=self.infra.bootstrap,
                             producer=None,  # type: ignore[arg-type]
                             metrics=RuntimeMetrics.create(CollectorRegistry()),
                             settings=settings)  # fmt: skip
        return svc, rt

    def unsent(self) -> int:
        """Outbox rows the relay has not marked sent yet."""
        return int(query(self.conninfo, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")[0][0])

    def out_seqs_in_key_order(self) -> dict[str, list[int]]:
        """Per key, the seqs of the out topic in log order with re-published duplicates
        removed (a relay that dies after sending re-sends; consumers' inboxes absorb it).
        Fails if what remains is not strictly increasing: that would be a reordering."""
        seen: set[str] = set()
        per_key: dict[str, list[int]] = defaultdict(list)
        for _, _, key, env in published(self.infra.bootstrap, self.out_topic):
            if env["event_id"] not in seen:
                seen.add(env["event_id"])
                per_key[str(key)].append(int(env["payload"]["seq"]))
        for key, seqs in per_key.items():
            assert all(a < b for a, b in itertools.pairwise(seqs)), f"{key} reordered: {seqs}"
        return per_key

    def applied(self, group: str | None = None) -> list[tuple[str, int, str]]:
        return [
            (r[0], r[1], r[2])
            for r in query(
                self.conninfo,
                "SELECT account, seq, event_id FROM ledger_applied"
                " WHERE consumer_group = %s ORDER BY id",
                group or self.group,
            )
        ]


@pytest.fixture
def ledger(infra: Infra) -> Iterator[Ledger]:
    t = uid()
    dbname = f"paysaga_rt_{t}"
    lg = Ledger(infra, create_runtime_db(infra, dbname), f"test.in.{t}", f"test.out.{t}",
                f"paysaga.test-{t}", dbname)  # fmt: skip
    # kept for good: a test writes records stamped days ago, which the broker's retention
    # (its first pass runs 30 s after it starts) would otherwise delete mid-test
    keep = {"retention.ms": "-1"}
    for topic in (lg.in_topic, lg.out_topic, f"{lg.group}.dlq", f"{lg.group}-down.dlq"):
        asyncio.run(create_topic(infra.bootstrap, topic, 3, keep))
    yield lg
    for p in lg.procs:
        p.kill()
    drop_db(infra, dbname)


Check = Callable[[], object]


@pytest.fixture
def inventory_proc(infra: Infra) -> Iterator[Proc]:
    """The inventory service as a process on the test infrastructure."""
    migrate.upgrade("inventory", infra.db_url("paysaga_inventory"))  # idempotent
    proc = Proc(
        f"inventory-{uid()}",
        ["-m", "services.inventory.app"],
        env={
            "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": infra.bootstrap,
            "PAYSAGA_DATABASE_URL": infra.database_url,
            "PAYSAGA_INVENTORY_PORT": str(free_port()),
            "PAYSAGA_POLL_TIMEOUT_MS": "200",
        },
    ).start()
    yield proc
    proc.stop()
