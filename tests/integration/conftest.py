from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import create_engine

from services.runtime.tables import metadata as runtime_metadata
from tests.conftest import Infra
from tests.support import ledger_service
from tests.support.harness import Proc, create_topic, free_port, query, uid

RUNTIME_DB = "paysaga_runtime_test"


@pytest.fixture(scope="session")
def runtime_db(infra: Infra) -> str:
    """A database with the runtime's tables and the ledger test service's table."""
    admin = infra.conninfo("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (RUNTIME_DB,)).fetchone():
            conn.execute(f'CREATE DATABASE "{RUNTIME_DB}"')
    engine = create_engine(infra.db_url(RUNTIME_DB))
    runtime_metadata.create_all(engine)
    ledger_service.metadata.create_all(engine)
    engine.dispose()
    return infra.db_url(RUNTIME_DB)


@dataclasses.dataclass
class Ledger:
    """One test's topics, group and processes of the ledger service."""

    infra: Infra
    db_url: str
    in_topic: str
    out_topic: str
    group: str
    procs: list[Proc] = dataclasses.field(default_factory=list)

    @property
    def conninfo(self) -> str:
        return self.infra.conninfo(RUNTIME_DB)

    def process(self, name: str = "ledger", group: str | None = None, in_topic: str | None = None,
                out_topic: str | None = "default", **env: str) -> Proc:  # fmt: skip
        argv = ["-m", "tests.support.ledger_service", "--in-topic", in_topic or self.in_topic,
                "--group", group or self.group, "--db-url", self.db_url,
                "--bootstrap", self.infra.bootstrap, "--port", str(free_port())]  # fmt: skip
        out = self.out_topic if out_topic == "default" else out_topic
        if out:
            argv += ["--out-topic", out]
        proc = Proc(f"{self.group}-{name}", argv, env={"PAYSAGA_POLL_TIMEOUT_MS": "200", **env})
        self.procs.append(proc)
        return proc

    def applied(self, group: str | None = None) -> list[tuple[str, int, str]]:
        return [
            (r[0], r[1], r[2])
            for r in query(
                self.conninfo,
                "SELECT account, seq, event_id FROM ledger_applied WHERE consumer_group = %s ORDER BY id",
                group or self.group,
            )
        ]


@pytest.fixture
def ledger(infra: Infra, runtime_db: str) -> Iterator[Ledger]:
    t = uid()
    lg = Ledger(infra, runtime_db, f"test.in.{t}", f"test.out.{t}", f"paysaga.test-{t}")
    for topic in (lg.in_topic, lg.out_topic, f"{lg.group}.dlq", f"{lg.group}-down.dlq"):
        asyncio.run(create_topic(infra.bootstrap, topic, 3))
    yield lg
    for p in lg.procs:
        p.kill()


Check = Callable[[], object]
