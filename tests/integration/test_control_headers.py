"""Headers on an input topic carry no authority (docs/contract.md §1): the inventory service as
a real process reads ``catalog.stock.v1`` records that carry replay and release headers
like a dead-letter topic's control records, and treats them as the stock levels they
are. Control reaches a consumer group only through its own dead-letter topic."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.runtime import dlq, migrate
from tests.conftest import Infra
from tests.integration.test_saga_fixes import DB, GROUP, stock_level
from tests.support.harness import Proc, caught_up, envelope, produce, query, uid, wait_for

pytestmark = pytest.mark.integration

CATALOG = "catalog.stock.v1"


@pytest.fixture(scope="module")
def inventory_db(infra: Infra) -> str:
    migrate.upgrade("inventory", infra.db_url(DB))  # idempotent
    return infra.conninfo(DB)


def stock_record(sku: str, **payload: object) -> bytes:
    return envelope("StockLevelSet", {"sku": sku, **payload})


def open_dead_letter(conninfo: str, sku: str) -> list[tuple[str, int, int]]:
    rows = query(
        conninfo,
        'SELECT topic, partition, "offset" FROM dead_letters'
        " WHERE consumer_group = %s AND order_key = %s AND resolved_at IS NULL",
        GROUP,
        f"{CATALOG}:{sku}",
    )
    return [(r[0], r[1], r[2]) for r in rows]


def parked(conninfo: str, sku: str) -> int:
    rows = query(
        conninfo,
        "SELECT count(*) FROM parked WHERE consumer_group = %s AND order_key = %s",
        GROUP,
        f"{CATALOG}:{sku}",
    )
    return int(rows[0][0])


def test_a_stock_level_addressed_to_another_group_is_applied(
    infra: Infra, inventory_db: str, inventory_proc: Proc
) -> None:
    sku = uid("sku-hdr-")
    headers = [
        (dlq.H_TARGET_GROUP, b"paysaga.someone-else"),
        (dlq.H_REPLAY_OF, b'["paysaga.someone-else.dlq", 0, 0]'),
        ("paysaga-dlq-consumer-group", b"paysaga.someone-else"),
    ]
    value = stock_record(sku, available=5)
    asyncio.run(produce(infra.bootstrap, CATALOG, [(sku, value)], headers=headers))
    wait_for(lambda: stock_level(inventory_db, sku) == (5, 0, 0), what=f"stock of {sku}")


def test_a_spoofed_release_or_replay_on_an_input_topic_changes_nothing(
    infra: Infra, inventory_db: str, inventory_proc: Proc
) -> None:
    b = infra.bootstrap
    sku = uid("sku-spoof-")
    asyncio.run(produce(b, CATALOG, [(sku, stock_record(sku, available=5))]))
    wait_for(lambda: stock_level(inventory_db, sku) == (5, 0, 0), what="stock set")
    asyncio.run(produce(b, CATALOG, [(sku, stock_record(sku))]))  # no quantity: dead letter
    [named] = wait_for(lambda: open_dead_letter(inventory_db, sku), what="dead letter")
    asyncio.run(produce(b, CATALOG, [(sku, stock_record(sku, available=9))]))
    wait_for(lambda: parked(inventory_db, sku) == 1, what="the next stock level parked")

    # what `paysaga dlq purge` and `replay` write to the group's dead-letter topic, written
    # to the input topic instead, by anyone who may produce there
    dead_letter = json.dumps(named).encode()
    release = [(dlq.H_TARGET_GROUP, GROUP.encode()), (dlq.H_CONTROL, dlq.CONTROL_RELEASE),
               (dlq.H_DEAD_LETTER, dead_letter)]  # fmt: skip
    replay = [(dlq.H_TARGET_GROUP, GROUP.encode()), (dlq.H_REPLAY_OF, b'["x.dlq", 0, 0]'),
              (dlq.H_DEAD_LETTER, dead_letter)]  # fmt: skip
    asyncio.run(produce(b, CATALOG, [(sku, b"{}")], headers=release))
    asyncio.run(produce(b, CATALOG, [(sku, stock_record(sku, available=7))], headers=replay))
    wait_for(lambda: caught_up(infra.conninfo(DB), b, GROUP, CATALOG), what="consumed")

    assert open_dead_letter(inventory_db, sku) == [named]  # still open: nothing released
    assert stock_level(inventory_db, sku) == (5, 0, 0)  # nothing applied past it
    assert parked(inventory_db, sku) == 3  # the two records are parked behind it like any
