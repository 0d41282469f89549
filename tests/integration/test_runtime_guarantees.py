"""The runtime's delivery guarantees under crashes, duplicates, rebalances and slow
handlers, proven with the ledger test service in real processes against the real
Kafka broker and PostgreSQL. Every check polls stored rows or emitted records with a
deadline; "exactly once" always means: one ``ledger_applied`` row per event."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import dlq
from services.runtime.consumer import ConsumerRuntime, RuntimeSettings
from services.runtime.messages import Record
from services.runtime.metrics import RuntimeMetrics
from tests.integration.conftest import Ledger
from tests.support import ledger_service
from tests.support.harness import (
    Feeder,
    Proc,
    assert_once_in_key_order,
    caught_up,
    cli,
    credit,
    envelope,
    produce,
    published,
    query,
    read_all,
    stream,
    uid,
    wait_for,
)

pytestmark = pytest.mark.integration

#: A member that dies or stalls is noticed within seconds instead of the default 10 s.
FAST_GROUP = {"PAYSAGA_SESSION_TIMEOUT_MS": "6000", "PAYSAGA_HEARTBEAT_INTERVAL_MS": "1000"}


def member_of(proc: Proc) -> list[str] | None:
    """The process's current partitions if it has any (for wait_for)."""
    return proc.assignment() or None


# ------------------------------------------------------------------ 1. relay crash


def test_relay_crash_after_send_before_mark_duplicates_are_applied_once_downstream(
    ledger: Ledger,
) -> None:
    b = ledger.infra.bootstrap
    asyncio.run(produce(b, ledger.in_topic, [credit(f"acct{i % 5}", i) for i in range(30)]))
    crashing = ledger.process("relay-crash").start(
        PAYSAGA_FAULT_POINT="relay_after_send_before_mark"
    )
    assert crashing.wait_exit(60) == 86
    sent_before_crash = {env["event_id"] for *_, env in published(b, ledger.out_topic)}
    assert sent_before_crash, "the relay published before it died"
    never_marked = {
        json.loads(v)["event_id"]
        for (v,) in query(ledger.conninfo, "SELECT value FROM outbox WHERE sent_at IS NULL")
    }
    assert sent_before_crash <= never_marked  # acknowledged by Kafka, not marked sent

    ledger.process("upstream").start()
    down = f"{ledger.group}-down"
    ledger.process("downstream", group=down, in_topic=ledger.out_topic, out_topic=None).start()

    wait_for(lambda: len(ledger.applied()) == 30 and ledger.unsent() == 0, what="all relayed")
    out = [env["event_id"] for *_, env in published(b, ledger.out_topic)]
    assert len(set(out)) == 30
    assert len(out) > 30, "the re-published rows are in the out topic twice"
    assert sent_before_crash <= {e for e in out if out.count(e) > 1}

    wait_for(lambda: caught_up(ledger.conninfo, b, down, ledger.out_topic), what="downstream done")
    applied_down = ledger.applied(down)
    assert sorted(e for *_, e in applied_down) == sorted(set(out))  # each event exactly once
    assert_once_in_key_order(applied_down, set(range(30)))
    assert_once_in_key_order(ledger.applied(), set(range(30)))


# ------------------------------------------------ 2. concurrent duplicate delivery


def test_same_event_delivered_concurrently_to_two_members_is_applied_once(ledger: Ledger) -> None:
    b = ledger.infra.bootstrap
    a = ledger.process("a").start()
    c = ledger.process("c").start()
    # both members hold partitions before the copies arrive, so they race for the event
    wait_for(lambda: member_of(a) and member_of(c) and
             len(set(a.assignment() or ()) | set(c.assignment() or ())) == 3,
             what="two members sharing the partitions")  # fmt: skip
    same = envelope("Credit", {"account": "acctX", "amount": 5, "seq": 1})
    asyncio.run(produce(b, ledger.in_topic, [(f"copy{i}", same) for i in range(20)]))

    spread = {f"{m.topic}/{m.partition}" for m in asyncio.run(read_all(b, ledger.in_topic))}
    assert spread & set(member_of(a) or ()), "copies went to the first member"
    assert spread & set(member_of(c) or ()), "copies went to the second member"
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic), what="all seen")
    assert [(acct, seq) for acct, seq, _ in ledger.applied()] == [("acctX", 1)]
    wait_for(lambda: ledger.unsent() == 0, what="relayed")
    assert len(published(b, ledger.out_topic)) == 1  # one application, one emitted event


# ------------------------------------------------------------------ 3. rebalance


def test_member_joining_mid_stream_keeps_exactly_once_and_key_order(ledger: Ledger) -> None:
    b = ledger.infra.bootstrap
    first = ledger.process("first").start(**FAST_GROUP)
    feeder = Feeder(b, ledger.in_topic, stream(), per_second=150)
    feeder.start()
    try:
        wait_for(lambda: len(ledger.applied()) >= 60, what="first member consuming")
        second = ledger.process("second").start(**FAST_GROUP)
        wait_for(lambda: member_of(second), what="second member assigned")
        # the stream keeps flowing across the rebalance and onto both members
        at_join = feeder.sent
        wait_for(lambda: len(ledger.applied()) >= at_join + 150, what="flow after the join")
    finally:
        total = feeder.finish()

    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic),
             timeout=90, what="all processed")  # fmt: skip
    assert_once_in_key_order(ledger.applied(), set(range(total)))
    pids = {r[0] for r in query(ledger.conninfo, "SELECT DISTINCT pid FROM ledger_applied")}
    assert pids == {first.pid, second.pid}, "both members applied records"
    wait_for(lambda: ledger.unsent() == 0, what="relayed")
    assert sum(map(len, ledger.out_seqs_in_key_order().values())) == total


# ------------------------------------------------------------------ 4. DLQ tooling


def dead_letter_refs(lg: Ledger) -> list[str]:
    """The dead letters of the group's .dlq topic (not the replays and releases there)."""
    return [
        f"{m.topic}:{m.partition}:{m.offset}"
        for m in asyncio.run(read_all(lg.infra.bootstrap, f"{lg.group}.dlq"))
        if not any(k == dlq.H_TARGET_GROUP for k, _ in m.headers or ())
    ]


def dead_letter_rows(lg: Ledger) -> list[tuple[str, int, str | None]]:
    """(order key, original offset, resolution) of every dead letter, oldest first."""
    return [
        (r[0], r[1], r[2])
        for r in query(
            lg.conninfo, 'SELECT order_key, "offset", resolution FROM dead_letters ORDER BY id'
        )
    ]


def seqs_of(lg: Ledger, account: str) -> list[int]:
    return [s for a, s, _ in lg.applied() if a == account]


def parked_count(lg: Ledger) -> int:
    return int(query(lg.conninfo, "SELECT count(*) FROM parked")[0][0])


def test_dlq_purge_releases_the_parked_records_of_the_key_in_order(ledger: Ledger) -> None:
    b = ledger.infra.bootstrap
    asyncio.run(produce(b, ledger.in_topic, [
        credit("k1", 1), ("k1", b"{not json"), credit("k1", 2), credit("k1", 3), credit("k2", 10),
    ], partition=0))  # fmt: skip
    ledger.process().start()
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic), what="consumed")
    assert seqs_of(ledger, "k1") == [1]
    assert seqs_of(ledger, "k2") == [10]
    assert parked_count(ledger) == 2
    [ref] = wait_for(lambda: dead_letter_refs(ledger), what="dead letter")

    listing = cli("dlq", "list", "--group", ledger.group, bootstrap=b).stdout
    assert ref in listing
    assert "invalid_json" in listing
    assert "1 dead letter(s)" in listing

    cli("dlq", "purge", ref, bootstrap=b)
    wait_for(lambda: seqs_of(ledger, "k1") == [1, 2, 3], what="parked records applied")
    assert dead_letter_rows(ledger) == [("k1", 1, "purged")]
    assert parked_count(ledger) == 0
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic), what="consumed")
    assert seqs_of(ledger, "k1") == [1, 2, 3]  # the purged record itself was never applied


def test_dlq_purge_stops_again_at_a_poison_record_among_the_parked(ledger: Ledger) -> None:
    """Releasing a key applies its parked records in order; one that fails permanently
    becomes the key's new dead letter and keeps the rest parked behind it."""
    b = ledger.infra.bootstrap
    asyncio.run(produce(b, ledger.in_topic, [
        credit("k1", 1), ("k1", b"{not json"), credit("k1", 2),
        ("k1", envelope("Credit", {"account": "k1", "seq": 3})),  # amount missing
        credit("k1", 4),
    ], partition=0))  # fmt: skip
    ledger.process().start()
    [first] = wait_for(lambda: dead_letter_refs(ledger), what="first dead letter")
    wait_for(lambda: parked_count(ledger) == 3, what="three parked")

    cli("dlq", "purge", first, bootstrap=b)
    refs = wait_for(
        lambda: len(r := dead_letter_refs(ledger)) == 2 and r, what="second dead letter"
    )
    wait_for(lambda: dead_letter_rows(ledger) == [("k1", 1, "purged"), ("k1", 3, None)],
             what="the parked poison dead-lettered")  # fmt: skip
    assert seqs_of(ledger, "k1") == [1, 2]  # up to the poison, and not past it
    assert parked_count(ledger) == 1

    cli("dlq", "purge", refs[1], bootstrap=b)
    wait_for(lambda: seqs_of(ledger, "k1") == [1, 2, 4], what="the rest released")
    assert parked_count(ledger) == 0
    assert [r[2] for r in dead_letter_rows(ledger)] == ["purged", "purged"]


def test_dlq_replay_after_the_cause_is_fixed_applies_once_even_replayed_twice(
    ledger: Ledger, tmp_path: Path
) -> None:
    b = ledger.infra.bootstrap
    broken = tmp_path / "broken"
    broken.touch()
    asyncio.run(produce(b, ledger.in_topic, [
        credit("k2", 1), credit("k2", 2, fail_until_file=str(broken)), credit("k2", 3),
        ("k2", envelope("Credit", {"account": "k2", "seq": 4})),  # amount missing: poison
        credit("k2", 5), credit("k3", 7),
    ], partition=1))  # fmt: skip
    ledger.process().start()
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic), what="consumed")
    assert seqs_of(ledger, "k2") == [1]
    assert seqs_of(ledger, "k3") == [7]
    [ref] = wait_for(lambda: dead_letter_refs(ledger), what="dead letter")
    listing = cli("dlq", "list", "--group", ledger.group, bootstrap=b).stdout
    assert ref in listing
    assert "not_yet_fixed" in listing
    assert "1 dead letter(s)" in listing

    broken.unlink()  # the operator fixes the cause
    cli("dlq", "replay", ref, bootstrap=b)
    wait_for(lambda: seqs_of(ledger, "k2") == [1, 2, 3], what="replayed, then the parked 3")
    # the release stopped at the poison: it is the key's dead letter now, 5 waits behind it
    wait_for(lambda: dead_letter_rows(ledger) == [("k2", 1, "replayed"), ("k2", 3, None)],
             what="the parked poison dead-lettered")  # fmt: skip
    assert parked_count(ledger) == 1

    cli("dlq", "replay", ref, bootstrap=b)  # an SRE runs it again: harmless
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic), what="consumed")
    assert seqs_of(ledger, "k2") == [1, 2, 3]  # not applied twice...
    assert dead_letter_rows(ledger) == [("k2", 1, "replayed"), ("k2", 3, None)]
    assert parked_count(ledger) == 1  # ...and 5 is not released past the open poison

    [*_, poison] = dead_letter_refs(ledger)
    cli("dlq", "purge", poison, bootstrap=b)
    wait_for(lambda: seqs_of(ledger, "k2") == [1, 2, 3, 5], what="5 released by the purge")
    assert [r[2] for r in dead_letter_rows(ledger)] == ["replayed", "purged"]


# ------------------------------------------------------------------ 6. relay failover


def test_standby_relay_takes_over_when_the_active_one_is_killed(ledger: Ledger) -> None:
    b = ledger.infra.bootstrap
    active = ledger.process("active").start(**FAST_GROUP)
    wait_for(lambda: "relay is active" in active.log_text(), what="first relay active")
    standby = ledger.process("standby").start(**FAST_GROUP)
    wait_for(lambda: member_of(standby), what="standby consuming")
    assert "relay is active" not in standby.log_text()  # the advisory lock is taken

    feeder = Feeder(b, ledger.in_topic, stream(), per_second=150)
    feeder.start()
    try:
        wait_for(lambda: len(asyncio.run(read_all(b, ledger.out_topic))) >= 60, what="relaying")
        active.kill()  # SIGKILL: its lock goes with its database session
        wait_for(lambda: "relay is active" in standby.log_text(), what="standby took over")
        at_takeover = feeder.sent
        wait_for(lambda: len(ledger.applied()) >= at_takeover + 100, what="flow after takeover")
    finally:
        total = feeder.finish()

    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic)
             and ledger.unsent() == 0, timeout=90, what="all processed and relayed")  # fmt: skip
    assert_once_in_key_order(ledger.applied(), set(range(total)))
    per_key = ledger.out_seqs_in_key_order()  # nothing reordered per key...
    assert sorted(itertools.chain(*per_key.values())) == list(range(total))  # ...or lost


# ------------------------------------------------------------ 7. slow handler


def test_handler_slower_than_max_poll_interval_is_applied_once(ledger: Ledger) -> None:
    """The slow member overruns max.poll.interval and leaves the group; the other member
    takes its partitions and re-reads the slow record, whose inbox row is still locked by
    the first member's open transaction — it waits, then sees a duplicate. No loop."""
    b = ledger.infra.bootstrap
    env = {"PAYSAGA_MAX_POLL_INTERVAL_MS": "2000", **FAST_GROUP}
    slow = ledger.process("slow").start(**env)
    wait_for(lambda: member_of(slow), what="first member assigned")
    other = ledger.process("other").start(**env)
    wait_for(lambda: member_of(other) and len(member_of(slow) or ()) < 3, what="both members")
    # the slow record goes to a partition of the first member
    slow_tp = sorted(member_of(slow) or ())[0]
    partition = int(slow_tp.rsplit("/", 1)[1])
    asyncio.run(produce(b, ledger.in_topic, [
        credit("k1", 1), credit("k1", 2, sleep_s=4), credit("k1", 3),
    ], partition=partition))  # fmt: skip
    wait_for(lambda: len(ledger.applied()) >= 3, what="slow record applied")
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", 4), credit("k2", 5), credit("k3", 6)]))
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic)
             and len(ledger.applied()) >= 6, what="later records applied")  # fmt: skip
    assert_once_in_key_order(ledger.applied(), {1, 2, 3, 4, 5, 6})
    # the other member really was handed the partition while the slow handler ran
    assert any(slow_tp in a for a in other.assignments()), other.assignments()
    assert slow.alive
    assert other.alive


# ------------------------------------------------------- 8. offsets missing from the log


async def produce_in_transactions(
    bootstrap: str, topic: str, transactions: list[list[tuple[str, bytes]]], partition: int
) -> None:
    """One Kafka transaction per list: each commit writes a marker that takes an offset
    no consumer ever sees (under read_committed), as an upstream transactional producer's
    would."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=uid("tx"))
    await producer.start()
    try:
        for records in transactions:
            async with producer.transaction():
                for key, value in records:
                    await producer.send_and_wait(
                        topic, value=value, key=key.encode(), partition=partition
                    )
    finally:
        await producer.stop()


def stored_position(lg: Ledger, partition: int) -> int | None:
    rows = query(lg.conninfo, "SELECT next_offset FROM consumer_positions"
                 " WHERE topic = %s AND partition = %s", lg.in_topic, partition)  # fmt: skip
    return int(rows[0][0]) if rows else None


def test_offsets_missing_from_the_log_do_not_stall_the_partition(ledger: Ledger) -> None:
    """Transaction markers occupy offsets that are never delivered (as do compacted-away
    records): a stored position pointing at one is continued from the next record."""
    b = ledger.infra.bootstrap
    tx = [[credit("k1", 1)], [credit("k1", 2)]]
    asyncio.run(produce_in_transactions(b, ledger.in_topic, tx, partition=0))
    svc = ledger.process().start()
    wait_for(lambda: seqs_of(ledger, "k1") == [1, 2], what="first transactions applied")
    # the stored position is now the offset of the commit marker after seq 2
    assert stored_position(ledger, 0) == 3
    asyncio.run(produce_in_transactions(b, ledger.in_topic, [[credit("k1", 3)]], partition=0))
    wait_for(lambda: seqs_of(ledger, "k1") == [1, 2, 3], what="record after a marker applied")

    svc.kill()  # restarting at a stored position that is a marker's offset
    assert stored_position(ledger, 0) == 5
    asyncio.run(produce_in_transactions(b, ledger.in_topic, [[credit("k1", 4)]], partition=0))
    ledger.process("restart").start()
    wait_for(lambda: seqs_of(ledger, "k1") == [1, 2, 3, 4], what="applied after the restart")
    wait_for(lambda: stored_position(ledger, 0) == 7, what="position past the last record")


def test_stored_position_below_the_log_start_continues_from_the_log_start(
    ledger: Ledger,
) -> None:
    b = ledger.infra.bootstrap
    asyncio.run(produce(b, ledger.in_topic, [credit("k1", i) for i in range(6)], partition=0))

    async def expire_before(offset: int) -> None:  # what retention does to old segments
        admin = AIOKafkaAdminClient(bootstrap_servers=b)
        await admin.start()
        try:
            tp = TopicPartition(ledger.in_topic, 0)
            await admin.delete_records({tp: RecordsToDelete(before_offset=offset)})
        finally:
            await admin.close()

    asyncio.run(expire_before(4))
    query(
        ledger.conninfo,
        "INSERT INTO consumer_positions (consumer_group, topic, partition, next_offset)"
        " VALUES (%s, %s, 0, 2) RETURNING 1",
        ledger.group,
        ledger.in_topic,
    )
    svc = ledger.process().start()
    wait_for(lambda: seqs_of(ledger, "k1") == [4, 5], what="the retained records applied")
    wait_for(lambda: stored_position(ledger, 0) == 6, what="position at the end")
    assert "below the log start 4: 2 record(s) expired" in svc.log_text()


# ------------------------------------------------------- 9. replay, purge: money and contract


def dead_letter_ref_of(lg: Ledger, key: str) -> str:
    [ref] = [
        f"{m.topic}:{m.partition}:{m.offset}"
        for m in asyncio.run(read_all(lg.infra.bootstrap, f"{lg.group}.dlq"))
        if m.key == key.encode() and not any(k == dlq.H_TARGET_GROUP for k, _ in m.headers)
    ]
    return ref


def test_replay_and_purge_write_nothing_to_the_original_topic_and_purged_copies_stay_unapplied(
    ledger: Ledger, tmp_path: Path
) -> None:
    b = ledger.infra.bootstrap
    broken = tmp_path / "broken"
    broken.touch()
    _, poison = credit("k1", 2, fail_until_file=str(broken))
    asyncio.run(produce(b, ledger.in_topic, [
        credit("k1", 1), ("k1", poison),
        ("k1", poison),  # a copy of it, e.g. an upstream relay re-publishing after a crash
        credit("k1", 3),
        credit("k2", 10), credit("k2", 11, fail_until_file=str(broken)), credit("k2", 12),
    ], partition=0))  # fmt: skip
    ledger.process().start()
    wait_for(lambda: caught_up(ledger.conninfo, b, ledger.group, ledger.in_topic), what="consumed")
    assert (seqs_of(ledger, "k1"), seqs_of(ledger, "k2")) == ([1], [10])
    assert parked_count(ledger) == 3
    in_topic_before = len(asyncio.run(read_all(b, ledger.in_topic)))

    broken.unlink()  # the cause is fixed; the operator purges k1's dead letter anyway
    cli("dlq", "purge", dead_letter_ref_of(ledger, "k1"), bootstrap=b)
    cli("dlq", "replay", dead_letter_ref_of(ledger, "k2"), bootstrap=b)
    wait_for(lambda: seqs_of(ledger, "k2") == [10, 11, 12], what="k2 replayed and released")
    wait_for(lambda: parked_count(ledger) == 0, what="k1 released")
    assert sorted(dead_letter_rows(ledger)) == [("k1", 1, "purged"), ("k2", 5, "replayed")]
    assert seqs_of(ledger, "k1") == [1, 3]  # the purged record's copy was not applied
    # the control records went to the group's own dead-letter topic, never to the
    # original one (which other groups read)
    assert len(asyncio.run(read_all(b, ledger.in_topic))) == in_topic_before
    assert len(dead_letter_refs(ledger)) == 2  # and the listing shows only dead letters


def test_release_whose_parked_record_fails_transiently_dead_letters_that_record(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Past the retry budget, the parked record becomes the key's dead letter; the purge
    itself is never dead-lettered (it would block the key behind a ``{}`` record)."""
    b = ledger.infra.bootstrap
    down = tmp_path / "down"
    down.touch()
    asyncio.run(produce(b, ledger.in_topic, [
        credit("k1", 1), ("k1", b"{not json"),
        credit("k1", 2, transient_until_file=str(down)), credit("k1", 3),
    ], partition=0))  # fmt: skip
    ledger.process(PAYSAGA_RETRY_BUDGET_S="1", PAYSAGA_RETRY_MAX_S="0.2").start()
    [first] = wait_for(lambda: dead_letter_refs(ledger), what="first dead letter")
    wait_for(lambda: parked_count(ledger) == 2, what="two parked")

    cli("dlq", "purge", first, bootstrap=b)
    wait_for(lambda: dead_letter_rows(ledger) == [("k1", 1, "purged"), ("k1", 2, None)],
             what="the transiently failing parked record dead-lettered")  # fmt: skip
    assert parked_count(ledger) == 1  # seq 3 waits behind it
    assert seqs_of(ledger, "k1") == [1]
    dead = [m for m in asyncio.run(read_all(b, f"{ledger.group}.dlq"))
            if not any(k == dlq.H_TARGET_GROUP for k, _ in m.headers)]  # fmt: skip
    assert dead[0].value == b"{not json"
    assert json.loads(dead[1].value)["payload"]["seq"] == 2
    assert len(dead) == 2  # the release record itself was not dead-lettered

    down.unlink()
    cli("dlq", "replay", dead_letter_refs(ledger)[1], bootstrap=b)
    wait_for(lambda: seqs_of(ledger, "k1") == [1, 2, 3], what="replayed, then 3 released")


# ------------------------------------------------------- 10. park/release race


def test_a_record_parked_while_another_member_releases_its_key_is_not_stranded(
    ledger: Ledger,
) -> None:
    """P parks a record of a blocked key (its batch read the key as blocked); R, on
    another member, releases the key before P commits. R must see P's parked row."""
    query(ledger.conninfo, "INSERT INTO dead_letters (consumer_group, order_key, topic,"
          " partition, \"offset\", error_class, error_message, attempts, first_failure_at)"
          " VALUES (%s, 'k1', %s, 0, 0, 'E', 'e', 1, now()) RETURNING 1",
          ledger.group, ledger.in_topic)  # fmt: skip
    key, value = credit("k1", 5)
    rec = Record(ledger.in_topic, 0, 1, key.encode(), value, (), 0)

    async def race() -> None:
        args = argparse.Namespace(group=ledger.group, db_url=ledger.db_url, bootstrap="",
                                  in_topic=ledger.in_topic, out_topic=None, port=0)  # fmt: skip
        svc = ledger_service.build(args)
        rt = ConsumerRuntime(service="ledger", group=ledger.group, routes=svc.routes,
                             engine=svc.engine, bootstrap="", producer=None,  # type: ignore[arg-type]
                             metrics=RuntimeMetrics.create(CollectorRegistry()),
                             settings=RuntimeSettings())  # fmt: skip
        try:
            async with svc.engine.begin() as p:
                assert await rt.blocking.open(p, blocked={"k1"}).apply(rec) == "parked"

                async def release() -> None:
                    async with svc.engine.begin() as r:
                        await rt.blocking.open(r).release("k1", "purged")

                r_task = asyncio.create_task(release())
                # R either finished (it did not wait for P) or waits for P's key lock
                deadline = asyncio.get_running_loop().time() + 30
                while not r_task.done() and not await lock_waiters(svc.engine):
                    assert asyncio.get_running_loop().time() < deadline, "R neither ran nor waited"
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(r_task, 30)
        finally:
            await svc.engine.dispose()

    asyncio.run(race())
    assert parked_count(ledger) == 0, "the parked record was stranded"
    assert seqs_of(ledger, "k1") == [5]
    assert dead_letter_rows(ledger) == [("k1", 0, "purged")]


async def lock_waiters(engine: AsyncEngine) -> int:
    async with engine.connect() as c:
        found = await c.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        )
        return int(found.scalar() or 0)
