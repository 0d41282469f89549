"""The runtime's guarantees, proven with a tiny service in real processes against the
real Kafka broker and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime import dlq
from tests.integration.conftest import Ledger
from tests.support.harness import envelope, produce, query, read_all, wait_for

pytestmark = pytest.mark.integration


def credits(n: int, accounts: int = 3, start: int = 0) -> list[tuple[str, bytes]]:
    return [
        (
            f"acct{i % accounts}",
            envelope("Credit", {"account": f"acct{i % accounts}", "amount": 1, "seq": i}),
        )
        for i in range(start, start + n)
    ]


def test_records_flow_through_consume_transaction_outbox_relay(ledger: Ledger) -> None:
    asyncio.run(produce(ledger.infra.bootstrap, ledger.in_topic, credits(30)))
    svc = ledger.process().start()
    rows = wait_for(lambda: len(ledger.applied()) == 30 and ledger.applied(), what="30 applied")
    assert sorted(r[1] for r in rows) == list(range(30))
    out = wait_for(
        lambda: (
            len(recs := asyncio.run(read_all(ledger.infra.bootstrap, ledger.out_topic))) >= 30
            and recs
        ),
        what="30 Credited published",
    )
    assert len(out) == 30
    assert {m.key.decode() for m in out} == {"acct0", "acct1", "acct2"}
    pos = query(
        ledger.conninfo,
        "SELECT sum(next_offset) FROM consumer_positions WHERE consumer_group=%s",
        ledger.group,
    )
    assert pos[0][0] == 30
    svc.stop()
    assert svc.wait_exit() == 0


def test_crash_after_db_commit_before_kafka_commit_applies_once(ledger: Ledger) -> None:
    asyncio.run(produce(ledger.infra.bootstrap, ledger.in_topic, credits(12)))
    crashing = ledger.process("crash").start(
        PAYSAGA_FAULT_POINT="after_db_commit_before_kafka_commit"
    )
    assert crashing.wait_exit() == 86
    committed = len(ledger.applied())
    assert committed > 0  # the batch committed in PostgreSQL before the crash
    ledger.process("restart").start()
    rows = wait_for(lambda: len(ledger.applied()) >= 12 and ledger.applied(), what="all applied")
    assert sorted(r[1] for r in rows) == list(range(12))  # each exactly once


def test_crash_inside_db_transaction_leaves_nothing_partial(ledger: Ledger) -> None:
    asyncio.run(produce(ledger.infra.bootstrap, ledger.in_topic, credits(6)))
    crashing = ledger.process("crash").start(
        PAYSAGA_FAULT_POINT="inside_db_transaction", PAYSAGA_FAULT_AFTER="3"
    )
    assert crashing.wait_exit() == 86
    assert ledger.applied() == []  # the batch's transaction never committed
    assert (
        query(ledger.conninfo, "SELECT count(*) FROM outbox o WHERE o.topic=%s", ledger.out_topic)[
            0
        ][0]
        == 0
    )
    ledger.process("restart").start()
    rows = wait_for(lambda: len(ledger.applied()) >= 6 and ledger.applied(), what="reprocessed")
    assert sorted(r[1] for r in rows) == list(range(6))


def test_poison_record_is_dead_lettered_and_later_records_of_its_key_parked(ledger: Ledger) -> None:
    b = ledger.infra.bootstrap
    good_before = envelope("Credit", {"account": "k1", "amount": 1, "seq": 1})
    poison = envelope("Credit", {"account": "k1", "seq": 2})  # amount missing: schema violation
    parked_later = envelope("Credit", {"account": "k1", "amount": 1, "seq": 3})
    other_key = envelope("Credit", {"account": "k2", "amount": 1, "seq": 4})
    asyncio.run(
        produce(
            b,
            ledger.in_topic,
            [
                ("k1", good_before),
                ("k1", b"{not json"),
                ("k1", poison),
                ("k1", parked_later),
                ("k2", other_key),
            ],
            partition=0,
        )
    )
    ledger.process().start()
    wait_for(lambda: ("k2", 4) in [(a, s) for a, s, _ in ledger.applied()], what="k2 applied")
    applied = [(a, s) for a, s, _ in ledger.applied()]
    assert applied == [("k1", 1), ("k2", 4)]  # seq 3 is parked behind the dead letter
    dead = wait_for(lambda: asyncio.run(read_all(b, f"{ledger.group}.dlq")), what="dead letters")
    assert len(dead) == 1  # the bad JSON; the schema violation comes after it and is parked
    h = {k: v.decode() for k, v in dead[0].headers}
    assert h[dlq.H_TOPIC] == ledger.in_topic
    assert h[dlq.H_PARTITION] == "0"
    assert h[dlq.H_OFFSET] == "1"
    assert h[dlq.H_GROUP] == ledger.group
    assert h[dlq.H_ERROR_CLASS] == "PermanentError"
    assert "invalid_json" in h[dlq.H_ERROR_MESSAGE]
    assert h[dlq.H_ATTEMPTS] == "1"
    assert h[dlq.H_FIRST_FAILURE].endswith("Z")
    assert int(h[dlq.H_TIMESTAMP]) > 0
    parked = query(
        ledger.conninfo,
        "SELECT order_key, count(*) FROM parked WHERE consumer_group=%s GROUP BY 1",
        ledger.group,
    )
    assert parked == [("k1", 2)]


def test_relay_prunes_sent_outbox_rows_and_old_inbox_rows(ledger: Ledger) -> None:
    """Retention: sent outbox rows older than PAYSAGA_RELAY_OUTBOX_RETENTION_H and inbox
    rows older than PAYSAGA_RELAY_INBOX_RETENTION_DAYS go; unsent and recent rows stay."""
    c = ledger.conninfo
    query(
        c,
        "INSERT INTO inbox (consumer_group, dedupe_key, received_at) VALUES"
        " ('g', 'old', now() - interval '8 days'), ('g', 'recent', now()) RETURNING 1",
    )
    query(
        c,
        "INSERT INTO outbox (topic, key, value, created_at, sent_at) VALUES"
        " ('t', 'k', 'old', now() - interval '2 days', now() - interval '2 days'),"
        " ('t', 'k', 'recent', now(), now()) RETURNING 1",
    )
    ledger.process().start()

    def pruned() -> bool:
        inbox = {r[0] for r in query(c, "SELECT dedupe_key FROM inbox WHERE consumer_group='g'")}
        outbox = {bytes(r[0]) for r in query(c, "SELECT value FROM outbox WHERE topic='t'")}
        return inbox == {"recent"} and outbox == {b"recent"}

    wait_for(pruned, what="old inbox and sent outbox rows pruned")


def test_a_batchs_inbox_keys_are_claimed_for_the_records_it_applies_and_no_others(
    ledger: Ledger,
) -> None:
    """A batch enters the inbox keys of its records in one statement before applying
    them: the first copy of an event is applied and its second copy in the same batch
    is a duplicate; a record of a blocked key is parked with no inbox key entered (its
    release applies it later); an event type the group ignores enters none."""
    b = ledger.infra.bootstrap
    asyncio.run(produce(b, ledger.in_topic, [("k3", b"{not json")], partition=0))
    first = ledger.process("first").start()
    wait_for(lambda: asyncio.run(read_all(b, f"{ledger.group}.dlq")), what="k3 dead-lettered")
    first.stop()

    twice = envelope("Credit", {"account": "k1", "amount": 1, "seq": 1}, event_id="ev-twice")
    behind = envelope("Credit", {"account": "k3", "amount": 1, "seq": 7}, event_id="ev-behind")
    ignored = envelope("Noise", {"account": "k2"}, event_id="ev-ignored")
    after = envelope("Credit", {"account": "k1", "amount": 1, "seq": 2}, event_id="ev-after")
    batch = [("k3", behind), ("k1", twice), ("k2", ignored), ("k1", twice), ("k1", after)]
    asyncio.run(produce(b, ledger.in_topic, batch, partition=0))
    ledger.process("again").start()
    wait_for(lambda: ("k1", 2) in [(a, s) for a, s, _ in ledger.applied()], what="k1 applied")
    assert [(a, s, e) for a, s, e in ledger.applied()] == [
        ("k1", 1, "ev-twice"),
        ("k1", 2, "ev-after"),
    ]
    entered = query(
        ledger.conninfo,
        "SELECT dedupe_key FROM inbox WHERE consumer_group = %s ORDER BY 1",
        ledger.group,
    )
    assert entered == [("ev-after",), ("ev-twice",)]
    parked = query(
        ledger.conninfo,
        "SELECT order_key, count(*) FROM parked WHERE consumer_group = %s GROUP BY 1",
        ledger.group,
    )
    assert parked == [("k3", 1)]


def test_records_the_group_ignores_move_the_stored_position_and_change_nothing_else(
    ledger: Ledger,
) -> None:
    """A batch of event types the group does not consume is taken without a transaction
    of its own: the stored position follows within PAYSAGA_SKIPPED_POSITION_EVERY_S. No
    inbox key is entered for them, and one of a blocked key is not stored behind its dead
    letter (its release would only skip it)."""
    b = ledger.infra.bootstrap
    credit = envelope("Credit", {"account": "k1", "amount": 1, "seq": 1}, event_id="ev-credit")
    asyncio.run(produce(b, ledger.in_topic, [("k3", b"{not json"), ("k1", credit)], partition=0))
    ledger.process().start()
    wait_for(lambda: ledger.applied() == [("k1", 1, "ev-credit")], what="k1 applied")
    wait_for(lambda: asyncio.run(read_all(b, f"{ledger.group}.dlq")), what="k3 dead-lettered")

    noise = [(f"k{i % 4}", envelope("Noise", {"account": f"k{i % 4}"})) for i in range(40)]
    asyncio.run(produce(b, ledger.in_topic, noise, partition=0))

    def stored() -> int:
        rows = query(
            ledger.conninfo,
            "SELECT next_offset FROM consumer_positions"
            " WHERE consumer_group = %s AND topic = %s AND partition = 0",
            ledger.group,
            ledger.in_topic,
        )
        return int(rows[0][0]) if rows else -1

    wait_for(lambda: stored() == 42, what="the stored position past the ignored records")
    assert ledger.applied() == [("k1", 1, "ev-credit")]
    entered = query(
        ledger.conninfo, "SELECT dedupe_key FROM inbox WHERE consumer_group = %s", ledger.group
    )
    assert entered == [("ev-credit",)]
    parked = query(
        ledger.conninfo, "SELECT count(*) FROM parked WHERE consumer_group = %s", ledger.group
    )
    assert parked == [(0,)]  # k3's Noise records are not kept behind its dead letter
