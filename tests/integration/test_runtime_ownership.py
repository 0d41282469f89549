"""A record is dead-lettered only by its partition's owner: a member that lost the
partition while retrying the record stops, and a record whose inbox key is entered
counts as applied. Ledger service processes against the real Kafka and PostgreSQL; one
member loses its database through a proxy the test cuts."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.conftest import Ledger
from tests.integration.test_runtime_guarantees import (
    FAST_GROUP,
    dead_letter_refs,
    dead_letter_rows,
    member_of,
    parked_count,
    seqs_of,
)
from tests.support.harness import caught_up, credit, produce, query, wait_for
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def flags(lg: Ledger) -> list[tuple[str, str]]:
    rows = query(lg.conninfo, "SELECT account, error_class FROM ledger_flags")
    return [(r[0], r[1]) for r in rows]


def test_a_record_whose_partition_moved_during_its_retries_is_not_dead_lettered(
    ledger: Ledger,
) -> None:
    """The owner of partition 1 loses its database while it handles a record there and
    retries; the partition moves to another member, which applies the record. The first
    member's retries end with the move: nothing is dead-lettered, flagged or parked."""
    b = ledger.infra.bootstrap
    proxies = [TcpProxy.for_database(ledger.db_url) for _ in range(3)]
    env = {**FAST_GROUP, "PAYSAGA_RETRY_BUDGET_S": "20", "PAYSAGA_RETRY_MAX_S": "0.5"}
    procs = [
        ledger.process(f"m{i}", db_url=p.url(ledger.db_url), **env).start()
        for i, p in enumerate(proxies)
    ]

    def one_partition_each() -> list[str] | None:
        held = [member_of(p) or [] for p in procs]
        mine = [h[0] for h in held if len(h) == 1]
        return mine if len(set(mine)) == 3 else None

    # the range assignor deals partition n to the n-th member (by member id); when the
    # owner of partition 2 leaves, partition 1 moves to the owner of partition 0
    held = wait_for(one_partition_each, what="three members, one partition each")
    owner = {int(tp.rsplit("/", 1)[1]): procs[i] for i, tp in enumerate(held)}
    old, new, leaving = owner[1], owner[0], owner[2]
    cut = proxies[procs.index(old)]

    # the old owner processes a record of the partition first: it holds its position
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", 1)], partition=1))
    wait_for(lambda: seqs_of(ledger, "k1") == [1], what="first record applied")
    cut.cut()
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", 2)], partition=1))
    wait_for(lambda: "batch of 1 failed" in old.log_text(), what="the old owner retrying")

    leaving.stop()
    wait_for(lambda: seqs_of(ledger, "k1") == [1, 2], what="the new owner applied the record")
    [(pid,)] = query(ledger.conninfo, "SELECT pid FROM ledger_applied WHERE seq = 2")
    assert pid == new.pid
    wait_for(
        lambda: any(s in old.log_text() for s in ("left to its new owner", "dead-lettering")),
        timeout=60,
        what="the old owner's retries ended",
    )
    cut.restore()

    # the old owner works on (partition 2 is its own now); the key is not blocked
    asyncio.run(produce(b, ledger.in_topic, [credit("k2", 3)], partition=2))
    wait_for(lambda: seqs_of(ledger, "k2") == [3], what="the old owner processing again")
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", 4)], partition=1))
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic), what="consumed")
    assert dead_letter_rows(ledger) == []
    assert flags(ledger) == []
    assert parked_count(ledger) == 0
    assert dead_letter_refs(ledger) == []  # nothing was published to the dead-letter topic
    assert seqs_of(ledger, "k1") == [1, 2, 4]
    assert old.alive
    assert new.alive
