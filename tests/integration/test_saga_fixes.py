"""The inventory service as a real process over Kafka: a retry is never refused by its
own earlier attempt's units (F3), and a dead-lettered stock level never parks the
records of an order whose id is spelled like its SKU (F7)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.runtime import migrate
from tests.conftest import Infra
from tests.support.harness import (
    Proc,
    caught_up,
    envelope,
    produce,
    query,
    read_all,
    uid,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUP = "paysaga.inventory"
DB = "paysaga_inventory"


@pytest.fixture(scope="module")
def inventory_db(infra: Infra) -> str:
    migrate.upgrade("inventory", infra.db_url(DB))  # idempotent
    return infra.conninfo(DB)


def stock_level(conninfo: str, sku: str) -> tuple[Any, ...] | None:
    rows = query(conninfo, "SELECT available, reserved, sold FROM stock WHERE sku = %s", sku)
    return rows[0] if rows else None


def set_stock(infra: Infra, conninfo: str, sku: str, available: int) -> None:
    value = envelope("StockLevelSet", {"sku": sku, "available": available})
    asyncio.run(produce(infra.bootstrap, "catalog.stock.v1", [(sku, value)]))
    wait_for(lambda: stock_level(conninfo, sku) == (available, 0, 0), 60, f"stock of {sku}")


def context(order_id: str, attempt: int) -> dict[str, Any]:
    return {
        "order_id": order_id, "attempt": attempt, "payment_intent_id": uid("pi"),
        "transaction_id": uid("txn"), "flow": "authorization", "amount": 1500,
        "currency": "EUR", "gateway": "simgw",
    }  # fmt: skip


def accepted(ctx: dict[str, Any], sku: str, saga_seq: int) -> bytes:
    payload = {**ctx, "customer_id": "cus_1", "items": [{"sku": sku, "quantity": 1}],
               "payment_method_type": "card", "brand": "visa", "last4": "4242"}  # fmt: skip
    return envelope("PaymentAccepted", payload, saga_seq=saga_seq)


def inventory_events(infra: Infra, order_id: str) -> list[tuple[str, int]]:
    """(event_type, attempt) of every inventory event of the order, in log order."""
    records = asyncio.run(read_all(infra.bootstrap, "inventory.events.v1"))
    docs = [json.loads(r.value) for r in records if r.key == order_id.encode()]
    return [(d["event_type"], d["payload"]["attempt"]) for d in docs]


def reservations(conninfo: str, order_id: str) -> list[tuple[int, str]]:
    rows = query(
        conninfo,
        "SELECT attempt, state FROM reservations WHERE order_id = %s ORDER BY attempt",
        order_id,
    )
    return [(r[0], r[1]) for r in rows]


def open_dead_letters(conninfo: str, key: str) -> list[tuple[str, str]]:
    rows = query(
        conninfo,
        "SELECT order_key, topic FROM dead_letters"
        " WHERE consumer_group = %s AND order_key LIKE %s AND resolved_at IS NULL",
        GROUP,
        f"%{key}",
    )
    return [(r[0], r[1]) for r in rows]


def test_a_retry_is_not_refused_by_the_units_its_declined_attempt_holds(
    infra: Infra, inventory_db: str, inventory_proc: Proc
) -> None:
    """Attempt 1 holds the last unit, its capture is declined; the CaptureDeclined is
    still on its way (another topic) when PaymentAccepted of attempt 2 arrives."""
    sku, order_id = uid("sku-last-"), uid("ord")
    set_stock(infra, inventory_db, sku, 1)
    first, second = context(order_id, 1), context(order_id, 2)
    asyncio.run(
        produce(infra.bootstrap, "payments.events.v1", [(order_id, accepted(first, sku, 2))])
    )
    wait_for(lambda: inventory_events(infra, order_id), 60, "attempt 1 reserved")
    assert stock_level(inventory_db, sku) == (1, 1, 0)

    asyncio.run(
        produce(infra.bootstrap, "payments.events.v1", [(order_id, accepted(second, sku, 6))])
    )
    events = wait_for(
        lambda: (e := inventory_events(infra, order_id)) and len(e) >= 2 and e,
        60,
        "attempt 2's outcome",
    )
    assert events == [("StockReserved", 1), ("StockReserved", 2)]
    assert reservations(inventory_db, order_id) == [(1, "released"), (2, "reserved")]
    assert stock_level(inventory_db, sku) == (1, 1, 0)  # the unit moved to attempt 2

    # attempt 1's own release, late: a no-op (no event, no dead letter, stock unchanged)
    declined = envelope(
        "CaptureDeclined", {**first, "decline_code": "capture_declined"}, saga_seq=4
    )
    asyncio.run(produce(infra.bootstrap, "capture.events.v1", [(order_id, declined)]))
    wait_for(
        lambda: caught_up(inventory_db, infra.bootstrap, GROUP, "capture.events.v1"),
        60,
        "CaptureDeclined processed",
    )
    assert inventory_events(infra, order_id) == [("StockReserved", 1), ("StockReserved", 2)]
    assert open_dead_letters(inventory_db, order_id) == []
    assert reservations(inventory_db, order_id) == [(1, "released"), (2, "reserved")]
    assert stock_level(inventory_db, sku) == (1, 1, 0)


def test_a_dead_lettered_sku_does_not_park_an_order_spelled_alike(
    infra: Infra, inventory_db: str, inventory_proc: Proc
) -> None:
    same = uid("X")  # a SKU and an order id at once
    sku = uid("sku-ok-")
    set_stock(infra, inventory_db, sku, 5)
    set_stock(infra, inventory_db, same, 1)
    ctx = context(same, 1)
    asyncio.run(produce(infra.bootstrap, "payments.events.v1", [(same, accepted(ctx, same, 2))]))
    wait_for(lambda: inventory_events(infra, same), 60, "order reserved")
    # a quota below what is reserved is refused: the stock level is dead-lettered
    bad = envelope("StockLevelSet", {"sku": same, "available": 0})
    asyncio.run(produce(infra.bootstrap, "catalog.stock.v1", [(same, bad)]))
    dead = wait_for(lambda: open_dead_letters(infra.conninfo(DB), same), 60, "dead letter")
    assert [topic for _, topic in dead] == ["catalog.stock.v1"]

    # the order's next record (its capture of the SKU's unit) is applied, not parked
    captured = envelope("PaymentCaptured", {**ctx, "capture_id": "cap_1"}, saga_seq=4)
    asyncio.run(produce(infra.bootstrap, "capture.events.v1", [(same, captured)]))
    events = wait_for(
        lambda: (e := inventory_events(infra, same)) and len(e) >= 2 and e, 60, "committed"
    )
    assert events == [("StockReserved", 1), ("StockCommitted", 1)]
    assert reservations(inventory_db, same) == [(1, "committed")]
    assert stock_level(inventory_db, same) == (1, 0, 1)
    parked = query(
        inventory_db,
        "SELECT count(*) FROM parked WHERE consumer_group = %s AND order_key = %s",
        GROUP,
        same,
    )
    assert parked == [(0,)]
    # the SKU's own later records still wait behind its dead letter
    later = envelope("StockLevelSet", {"sku": same, "available": 9})
    asyncio.run(produce(infra.bootstrap, "catalog.stock.v1", [(same, later)]))
    wait_for(
        lambda: caught_up(inventory_db, infra.bootstrap, GROUP, "catalog.stock.v1"),
        60,
        "stock level parked",
    )
    assert stock_level(inventory_db, same) == (1, 0, 1)
