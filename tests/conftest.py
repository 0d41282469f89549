"""One session fixture chooses the infrastructure, in this order:

1. explicit settings (``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS`` and ``PAYSAGA_DATABASE_URL``,
   as ``make test`` sets them for its own test profile): those servers;
2. the local processes of the test profile (``services.devstack``: the real Kafka
   broker from its Maven jars, PostgreSQL from the machine's binaries), brought up if
   needed — unless their prerequisites are missing;
3. testcontainers, where a Docker engine answers (or ``PAYSAGA_TEST_BACKEND=
   testcontainers`` asks for it).

Topics and migrations are applied to whichever it is. Unit tests never touch it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest


@dataclasses.dataclass(frozen=True)
class Infra:
    bootstrap: str
    database_url: str  # server URL, SQLAlchemy form, no database

    def db_url(self, dbname: str) -> str:
        from services.runtime.settings import database_url_of

        return database_url_of(self.database_url, dbname)

    def conninfo(self, dbname: str) -> str:
        from services.runtime.settings import libpq_conninfo

        return libpq_conninfo(self.db_url(dbname))


def _local_prerequisites() -> bool:
    from services import devstack

    try:
        devstack.pg_bindir()
    except devstack.StackError:
        return False
    return shutil.which("java") is not None and shutil.which("mvn") is not None


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    return probe.returncode == 0


@contextlib.contextmanager
def _containers() -> Iterator[tuple[str, str]]:
    """Kafka (KRaft) and PostgreSQL in containers, for machines with Docker but without
    Java/Maven or PostgreSQL binaries."""
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer

    with (
        KafkaContainer().with_kraft() as kafka,
        PostgresContainer(
            "postgres:16", username="paysaga", password="paysaga", driver="psycopg"
        ) as pg,
    ):
        server = pg.get_connection_url().rsplit("/", 1)[0]
        yield kafka.get_bootstrap_server(), server


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    from services import devstack

    explicit = os.environ.get("PAYSAGA_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get(
        "PAYSAGA_DATABASE_URL"
    )
    wants_containers = os.environ.get("PAYSAGA_TEST_BACKEND") == "testcontainers"
    if not explicit and (wants_containers or (not _local_prerequisites() and _docker_answers())):
        with _containers() as (bootstrap, server):
            os.environ["PAYSAGA_KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
            os.environ["PAYSAGA_DATABASE_URL"] = server
            devstack.infra_up(devstack.PROFILES["test"])
            yield Infra(bootstrap, server)
        return
    if not explicit:
        devstack.infra_up(devstack.PROFILES["test"])
    yield Infra(os.environ["PAYSAGA_KAFKA_BOOTSTRAP_SERVERS"], os.environ["PAYSAGA_DATABASE_URL"])
