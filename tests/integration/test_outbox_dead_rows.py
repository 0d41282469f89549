"""An outbox row Kafka refuses for good (larger than its topic's max.message.bytes) must
not block the service's outbox forever: the relay sets it aside (``dead``, with the
error, not deleted), says so once (log, ``paysaga_outbox_stuck_records``, ``paysaga
reconcile``), keeps every other key flowing while the later rows of its key wait, and
``paysaga outbox retry`` publishes it — and then the rows behind it, in order — once the
operator raised the limit. Real broker, real PostgreSQL, the relay in a real process."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections import defaultdict

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.partitioner import DefaultPartitioner

from services.reconcile.rules import outbox_rules
from services.reconcile.stores import dead_outbox_rows
from tests.conftest import Infra
from tests.integration.conftest import Ledger
from tests.support.harness import REPO, cli, envelope, published, query, uid, wait_for

pytestmark = pytest.mark.integration

SMALL_LIMIT = 4096  # the test topic's max.message.bytes at first
BIG = 6000  # bytes of padding in the refused row


async def set_max_message_bytes(bootstrap: str, topic: str, limit: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(limit)})]
        )
    finally:
        await admin.close()


def same_partition_key(key: str, partitions: int = 3) -> str:
    """Another key the producer sends to ``key``'s partition: its rows share producer
    batches with ``key``'s, so a refused batch holds innocent rows too."""
    part = DefaultPartitioner()
    want = part(key.encode(), list(range(partitions)), list(range(partitions)))
    return next(
        k
        for i in range(1000)
        if part((k := f"{key}-{i}").encode(), list(range(partitions)), list(range(partitions)))
        == want
    )


def write_rows(ledger: Ledger, rows: list[tuple[str, int, int]]) -> dict[int, int]:
    """Outbox rows (key, seq, padding) in one transaction, as a handler writes them, and a
    NOTIFY for the relay; returns seq → row id."""
    values = ", ".join(["(%s, %s, %s)"] * len(rows))
    params: list[object] = []
    for key, seq, pad in rows:
        payload = {"account": key, "amount": 1, "seq": seq, "pad": "x" * pad}
        params += [ledger.out_topic, key.encode(), envelope("Credited", payload)]
    ids = query(
        ledger.conninfo,
        # only placeholders are formatted in; the values are parameters
        f"WITH w AS (INSERT INTO outbox (topic, key, value) VALUES {values} RETURNING id)"  # noqa: S608
        " SELECT id FROM w ORDER BY id",
        *params,
    )
    query(ledger.conninfo, "SELECT pg_notify('paysaga_outbox', '')")
    return {seq: row[0] for (_, seq, _), row in zip(rows, ids, strict=True)}


def is_sent(ledger: Ledger, row_id: int) -> bool:
    sql = "SELECT sent_at IS NOT NULL FROM outbox WHERE id = %s"
    return bool(query(ledger.conninfo, sql, row_id)[0][0])


def row_state(ledger: Ledger, row_id: int) -> tuple[bool, bool, str | None]:
    """(sent, dead, dead_error) of one outbox row."""
    sent, dead, error = query(
        ledger.conninfo,
        "SELECT sent_at IS NOT NULL, dead_at IS NOT NULL, dead_error FROM outbox WHERE id = %s",
        row_id,
    )[0]
    return bool(sent), bool(dead), error


def seqs_by_key(ledger: Ledger) -> dict[str, list[int]]:
    """Per key, the seqs in the out topic in log order, re-published copies removed."""
    seen: set[str] = set()
    out: dict[str, list[int]] = defaultdict(list)
    for _, _, key, env in published(ledger.infra.bootstrap, ledger.out_topic):
        if env["event_id"] not in seen:
            seen.add(env["event_id"])
            out[str(key)].append(int(env["payload"]["seq"]))
    return dict(out)


def stuck(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^paysaga_outbox_stuck_records\{service="ledger",state="(\w+)"\} (\S+)$',
            text,
            flags=re.MULTILINE,
        )
    }


def test_a_row_kafka_refuses_is_set_aside_shown_and_retried_without_loss(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = ledger.infra.bootstrap
    asyncio.run(set_max_message_bytes(b, ledger.out_topic, SMALL_LIMIT))
    k1 = f"acct-{uid()}"
    k2 = same_partition_key(k1)
    ids = write_rows(
        ledger,
        [(k1, 1, 0), (k2, 2, 0), (k1, 3, BIG), (k2, 4, 0), (k1, 5, 0), (k2, 6, 0)],
    )
    relay = ledger.process("relay").start(PAYSAGA_RELAY_POLL_S="0.2")
    port = int(relay.argv[relay.argv.index("--port") + 1])

    # every other row flows: k2's (one shared a producer batch with the big row) and
    # k1's row before it; the big row is set aside, k1's row behind it waits
    wait_for(
        lambda: all(is_sent(ledger, ids[s]) for s in (1, 2, 4, 6)),
        timeout=60,
        what="the rows of other keys, and k1's row before the refused one, published",
    )
    sent, _, error = wait_for(
        lambda: (st := row_state(ledger, ids[3]))[1] and st, what="the big row set aside"
    )
    assert not sent
    assert error is not None
    assert "MessageSizeTooLargeError" in error
    assert row_state(ledger, ids[5]) == (False, False, None)  # waits behind it, not dead
    assert seqs_by_key(ledger) == {k1: [1], k2: [2, 4, 6]}

    # visible: the metric, one error line, reconcile, `paysaga outbox list`
    wait_for(lambda: stuck(port) == {"dead": 1.0, "blocked": 1.0}, what="stuck gauge")
    monkeypatch.setenv("PAYSAGA_REFUNDS_DATABASE_URL", ledger.db_url)  # the CLI's "refunds"

    def error_lines() -> list[str]:
        return [
            line
            for line in relay.log_text().splitlines()
            if f"outbox row {ids[3]} refused by Kafka" in line
        ]

    [line] = error_lines()
    assert "ERROR" in line
    assert ledger.out_topic in line
    assert "Credited" in line
    assert "MessageSizeTooLargeError" in line
    [violation] = outbox_rules(dead_outbox_rows([k1]))
    assert violation.rule == "outbox_row_dead"
    assert violation.subject == k1
    assert f"outbox row {ids[3]}" in violation.detail
    assert ledger.out_topic in violation.detail
    assert outbox_rules(dead_outbox_rows([k2])) == []
    listed = cli("outbox", "list", "--service", "refunds", bootstrap=b).stdout
    assert re.search(rf"refunds\s.*\b{ids[3]}\b.*{re.escape(ledger.out_topic)}", listed), listed

    # later passes (k2 keeps flowing) do not repeat the error
    more = write_rows(ledger, [(k2, 7, 0)])
    wait_for(lambda: is_sent(ledger, more[7]), what="a later row of k2 published")
    assert len(error_lines()) == 1

    # the operator raises the limit and retries: the row, then the one behind it
    asyncio.run(set_max_message_bytes(b, ledger.out_topic, 1048588))
    retried = cli("outbox", "retry", "refunds", str(ids[3]), bootstrap=b).stdout
    assert f"row {ids[3]}" in retried
    wait_for(
        lambda: is_sent(ledger, ids[3]) and is_sent(ledger, ids[5]),
        what="the retried row and the one behind it published",
    )
    assert seqs_by_key(ledger) == {k1: [1, 3, 5], k2: [2, 4, 6, 7]}  # nothing lost, in order
    assert ledger.unsent() == 0
    wait_for(lambda: stuck(port) == {"dead": 0.0, "blocked": 0.0}, what="stuck gauge cleared")
    assert outbox_rules(dead_outbox_rows([k1])) == []
    again = subprocess.run(
        [sys.executable, "-m", "services.cli", "outbox", "retry", "refunds", str(ids[3])],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=60,
    )
    assert again.returncode == 1  # nothing dead to retry any more
    assert f"no dead outbox row {ids[3]}" in again.stdout


def test_reconcile_names_a_dead_outbox_row(infra: Infra) -> None:
    """``paysaga reconcile`` lists a service's dead outbox row as a violation."""
    key = f"ord_{uid()}"
    conninfo = infra.conninfo("paysaga_inventory")
    [(row_id,)] = query(
        conninfo,
        "INSERT INTO outbox (topic, key, value, dead_at, dead_error)"
        " VALUES ('inventory.events.v1', %s, %s, now(), 'MessageSizeTooLargeError: too big')"
        " RETURNING id",
        key.encode(),
        envelope("StockReserved", {"order_id": key}),
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "reconcile", "--order", key],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
            timeout=120,
            env={**os.environ, "COLUMNS": "250"},
        )
        assert done.returncode == 1, done.stdout + done.stderr
        [line] = [ln for ln in done.stdout.splitlines() if "outbox_row_dead" in ln]
        assert key in line
        assert f"inventory outbox row {row_id}" in line
    finally:
        query(conninfo, "DELETE FROM outbox WHERE id = %s RETURNING id", row_id)
