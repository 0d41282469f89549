"""One session fixture chooses the infrastructure, in this order:

1. explicit settings (``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS`` / ``PAYSAGA_DATABASE_URL``,
   as ``make test`` sets them for its own test profile): use those servers;
2. otherwise the local processes of the test profile (``services.devstack``), brought
   up if needed — a real Kafka broker and a real PostgreSQL, no Docker.

Unit tests (tests/unit) never touch it.
"""

from __future__ import annotations

import dataclasses
import os

import pytest


@dataclasses.dataclass(frozen=True)
class Infra:
    bootstrap: str
    database_url: str  # server URL, SQLAlchemy form, no database

    def db_url(self, dbname: str) -> str:
        return f"{self.database_url.rstrip('/')}/{dbname}"

    def conninfo(self, dbname: str) -> str:
        from services.runtime.service import libpq_conninfo

        return libpq_conninfo(self.db_url(dbname))


@pytest.fixture(scope="session")
def infra() -> Infra:
    from services import devstack

    if not (
        os.environ.get("PAYSAGA_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("PAYSAGA_DATABASE_URL")
    ):
        devstack.infra_up(devstack.PROFILES["test"])
    return Infra(os.environ["PAYSAGA_KAFKA_BOOTSTRAP_SERVERS"], os.environ["PAYSAGA_DATABASE_URL"])
