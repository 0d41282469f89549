"""Positions that do not fit the log are said loudly (log line, metric, ``/readyz``) and
never make records vanish: a stored position beyond the log end (a recreated topic) is
reset to the log start, and a partition without a stored position logs where it starts
(and, if Kafka had a committed offset for it, ``/readyz`` says so until it caught up).
Ledger service processes against the real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from tests.integration.conftest import Ledger
from tests.integration.test_runtime_guarantees import seqs_of, stored_position
from tests.support.harness import Proc, credit, produce, query, wait_for

pytestmark = pytest.mark.integration


def http(proc: Proc, path: str) -> httpx.Response | None:
    port = proc.argv[proc.argv.index("--port") + 1]
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
    except httpx.HTTPError:
        return None  # not listening yet


def r_status(proc: Proc) -> int | None:
    r = http(proc, "/readyz")
    return r.status_code if r is not None else None


def anomalies(proc: Proc, topic: str, kind: str) -> float | None:
    """``paysaga_consumer_position_anomalies_total`` of ``topic`` and ``kind``."""
    response = http(proc, "/metrics")
    if response is None:
        return None
    labels = f'kind="{kind}",service="ledger",topic="{topic}"'
    for line in response.text.splitlines():
        if line.startswith(f"paysaga_consumer_position_anomalies_total{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return None


async def recreate_topic(bootstrap: str, topic: str) -> None:
    """Delete ``topic`` and create it anew (empty, 3 partitions), as an operator might."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        deadline = time.monotonic() + 60
        while True:
            try:
                await admin.create_topics([NewTopic(topic, 3, 1)])
                return
            except TopicAlreadyExistsError:  # the deletion is still under way
                assert time.monotonic() < deadline, f"{topic} was not deleted"
                await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def committed_offset(bootstrap: str, group: str, tp: TopicPartition) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group, partitions=[tp])
        return found[tp].offset if tp in found and found[tp].offset >= 0 else None
    finally:
        await admin.close()


async def commit_offset(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    """Commit ``offset`` for ``group`` in Kafka (no member of it running). Auto-commit
    off: on ``stop`` an auto-committing consumer commits its own position — the committed
    offset it fetched on ``assign``, possibly before this commit landed — over it."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


def test_a_stored_position_beyond_the_log_end_is_reset_to_the_log_start_loudly(
    ledger: Ledger,
) -> None:
    b = ledger.infra.bootstrap
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", i) for i in range(5)], partition=0))
    first = ledger.process("first").start()
    wait_for(lambda: stored_position(ledger, 0) == 5, what="five records processed")
    first.stop()

    asyncio.run(recreate_topic(b, ledger.in_topic))
    # new records at offsets 0 and 1: below the stored position 5, never seen by the group
    fresh = [credit("k1", 10, sleep_s=3), credit("k1", 11)]
    asyncio.run(produce(b, ledger.in_topic, fresh, partition=0))
    svc = ledger.process("after").start()

    def positions_not_ready() -> tuple[int, dict[str, Any]] | None:
        r = http(svc, "/readyz")
        found = (r.status_code, r.json()) if r is not None else None
        return found if found and found[1]["checks"].get("positions") is False else None

    status, body = wait_for(positions_not_ready, what="/readyz failing while re-reading")
    assert (status, body["ready"]) == (503, False)
    [reason] = body["reasons"]
    assert f"{ledger.in_topic}/0" in reason
    assert "stored position 5 was beyond the log end 2" in reason
    wait_for(lambda: seqs_of(ledger, "k1") == [0, 1, 2, 3, 4, 10, 11], what="new records applied")
    wait_for(lambda: r_status(svc) == 200, what="/readyz green once they are processed")
    assert stored_position(ledger, 0) == 2
    assert anomalies(svc, ledger.in_topic, "beyond_log_end") == 1.0
    line = next(x for x in svc.log_text().splitlines() if "beyond the log end" in x)
    assert json.loads(line)["level"] == "ERROR"  # a JSON log line (services.runtime.logs)
    assert f"{ledger.group} {ledger.in_topic}/0: stored position 5 is beyond the log end 2" in line
    assert "consuming from the log start 0" in line


def test_without_a_stored_position_the_start_point_is_logged_and_shown(ledger: Ledger) -> None:
    b = ledger.infra.bootstrap
    tp = TopicPartition(ledger.in_topic, 0)
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", i) for i in range(3)], partition=0))
    first = ledger.process("first").start()
    wait_for(lambda: seqs_of(ledger, "k1") == [0, 1, 2], what="applied")
    assert (
        f"{ledger.group} {ledger.in_topic}/0: no stored position and no committed offset:"
        " a partition new to this group, consumed from the log start (offset 0)"
    ) in first.log_text()
    wait_for(lambda: asyncio.run(committed_offset(b, ledger.group, tp)) == 3, what="Kafka commit")
    first.stop()

    # the database loses its positions and its inbox (restored without them, say)
    query(ledger.conninfo, "DELETE FROM consumer_positions RETURNING 1")
    query(ledger.conninfo, "DELETE FROM inbox RETURNING 1")
    # a slow record: /readyz stays red while the partition catches up with its log end
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", 3, sleep_s=3)], partition=0))
    svc = ledger.process("again").start()

    def positions_not_ready() -> tuple[int, dict[str, Any]] | None:
        r = http(svc, "/readyz")
        found = (r.status_code, r.json()) if r is not None else None
        return found if found and found[1]["checks"].get("positions") is False else None

    status, body = wait_for(positions_not_ready, what="/readyz failing for the lost position")
    assert (status, body["ready"]) == (503, False)
    [reason] = body["reasons"]
    assert (
        f"{ledger.in_topic}/0: no stored position, but the group's committed offset in Kafka"
        " is 3: records below it are not read"
    ) in reason
    wait_for(lambda: seqs_of(ledger, "k1") == [0, 1, 2, 3], what="the new record applied")
    wait_for(lambda: r_status(svc) == 200, what="/readyz green once it caught up")
    line = next(x for x in svc.log_text().splitlines() if "no stored position" in x)
    assert json.loads(line)["level"] == "WARNING"
    assert (
        f"{ledger.group} {ledger.in_topic}/0: no stored position, but the group's committed"
        " offset in Kafka is 3: consuming from there (offset 3)"
    ) in line
    wait_for(lambda: anomalies(svc, ledger.in_topic, "no_stored_position") == 1.0, what="counted")
    # it started at the committed offset, as logged: 0..2 were not read (and applied) again
    wait_for(lambda: stored_position(ledger, 0) == 4, what="position stored")
    assert seqs_of(ledger, "k1") == [0, 1, 2, 3]


def test_a_reset_position_does_not_re_apply_records_the_inbox_has_forgotten(
    ledger: Ledger,
) -> None:
    """The broker lost its newest records (an unclean leader election): the stored
    position is beyond the log end, but the records still in the log were applied. The
    inbox remembers only ``inbox_retention_days``: re-reading older records would apply
    them a second time (a second capture or refund). The position is reset to the first
    record the inbox can still tell, not to the log start."""
    b = ledger.infra.bootstrap
    eight_days_ago = int((time.time() - 8 * 86400) * 1000)
    old = [credit("k1", i) for i in range(3)]
    asyncio.run(produce(b, ledger.in_topic, old, timestamp_ms=eight_days_ago, partition=0))
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", 3)], partition=0))
    first = ledger.process("first").start()
    wait_for(lambda: stored_position(ledger, 0) == 4, what="four records processed")
    first.stop()
    # the inbox rows of the old records were pruned; the broker lost offsets 4..6
    old_ids = [e for a, s, e in ledger.applied() if a == "k1" and s < 3]
    query(ledger.conninfo, "DELETE FROM inbox WHERE dedupe_key = ANY(%s) RETURNING 1", old_ids)
    query(ledger.conninfo, "UPDATE consumer_positions SET next_offset = 7"
          " WHERE topic = %s AND partition = 0 RETURNING 1", ledger.in_topic)  # fmt: skip
    tp = TopicPartition(ledger.in_topic, 0)
    asyncio.run(commit_offset(b, ledger.group, tp, 7))
    assert asyncio.run(committed_offset(b, ledger.group, tp)) == 7

    svc = ledger.process("after").start()
    wait_for(lambda: anomalies(svc, ledger.in_topic, "beyond_log_end") == 1.0, what="counted")
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", 4)], partition=0))
    wait_for(lambda: stored_position(ledger, 0) == 5, what="the new record processed")
    assert seqs_of(ledger, "k1") == [0, 1, 2, 3, 4]  # none applied twice
    line = next(x for x in svc.log_text().splitlines() if "beyond the log end" in x)
    assert "consuming from offset 3" in line
    assert "offsets 0..2 are older than the inbox retention" in line
