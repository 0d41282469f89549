"""Infrastructure outages under a flowing stream: the runtime retries in place and
loses, duplicates and dead-letters nothing.

These tests stop the test profile's shared PostgreSQL server for a few seconds (other
tests using it see the same outage), and always start it again."""

from __future__ import annotations

import asyncio

import pytest

from services.devstack import PROFILES, pg_down, pg_up
from tests.integration import conftest as integration
from tests.support.harness import (
    Feeder,
    assert_once_in_key_order,
    caught_up,
    query,
    read_all,
    stream,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

#: the integration tests' fixture: a fresh database, topics and the ledger's processes
ledger = integration.ledger

TEST_PG = PROFILES["test"]


def test_postgresql_outage_loses_duplicates_and_dead_letters_nothing(
    ledger: integration.Ledger,
) -> None:
    if ledger.infra.database_url.rstrip("/") != TEST_PG.database_url:
        pytest.skip("stops the local test PostgreSQL; this run uses another server")
    b = ledger.infra.bootstrap
    svc = ledger.process().start()
    feeder = Feeder(b, ledger.in_topic, stream(), per_second=100)
    feeder.start()
    try:
        wait_for(lambda: len(ledger.applied()) >= 50, what="records flowing")
        at_down = feeder.sent
        try:
            pg_down(TEST_PG)
            # an outage of ~5 s (well inside the 60 s retry budget), measured in records
            # that keep arriving meanwhile
            wait_for(lambda: feeder.sent >= at_down + 500, timeout=30, what="outage traffic")
        finally:
            pg_up(TEST_PG)
        at_up = feeder.sent
        wait_for(lambda: len(ledger.applied()) >= at_up, timeout=90, what="recovered")
    finally:
        total = feeder.finish()

    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic)
             and ledger.unsent() == 0, timeout=60, what="all processed and relayed")  # fmt: skip
    assert svc.alive, "the service rode out the outage instead of dying"
    log = svc.log_text()
    assert "relay stopped publishing" in log, "the outage really hit the service"
    assert_once_in_key_order(ledger.applied(), set(range(total)))
    assert query(ledger.conninfo, "SELECT count(*) FROM dead_letters")[0][0] == 0
    assert query(ledger.conninfo, "SELECT count(*) FROM parked")[0][0] == 0
    assert asyncio.run(read_all(b, f"{ledger.group}.dlq")) == []
    per_key = ledger.out_seqs_in_key_order()  # every Credited relayed, in order per key
    assert sorted(s for seqs in per_key.values() for s in seqs) == list(range(total))


def test_rebalance_during_postgresql_outage_keeps_members_alive(
    ledger: integration.Ledger,
) -> None:
    """A member joining while the database is down makes every member reload its stored
    positions for the new assignment: they wait for the database instead of dying."""
    if ledger.infra.database_url.rstrip("/") != TEST_PG.database_url:
        pytest.skip("stops the local test PostgreSQL; this run uses another server")
    b = ledger.infra.bootstrap
    fast = {"PAYSAGA_SESSION_TIMEOUT_MS": "6000", "PAYSAGA_HEARTBEAT_INTERVAL_MS": "1000"}
    first = ledger.process("first").start(**fast)
    feeder = Feeder(b, ledger.in_topic, stream(), per_second=100)
    feeder.start()
    try:
        wait_for(lambda: len(ledger.applied()) >= 50, what="records flowing")
        try:
            pg_down(TEST_PG)
            second = ledger.process("second").start(**fast)
            # the new member got partitions and tried to load their stored positions
            # while the database was down (or died trying: asserted below)
            wait_for(lambda: not second.alive or (second.assignment() and
                     "loading the position" in second.log_text()),
                     timeout=30, what="the rebalance, during the outage")  # fmt: skip
        finally:
            pg_up(TEST_PG)
        assert first.alive, first.log_text()[-3000:]
        assert second.alive, second.log_text()[-3000:]
        at_up = feeder.sent
        wait_for(lambda: len(ledger.applied()) >= at_up, timeout=90, what="recovered")
    finally:
        total = feeder.finish()

    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic)
             and ledger.unsent() == 0, timeout=60, what="all processed and relayed")  # fmt: skip
    assert first.alive
    assert second.alive
    assert_once_in_key_order(ledger.applied(), set(range(total)))
    assert query(ledger.conninfo, "SELECT count(*) FROM dead_letters")[0][0] == 0
