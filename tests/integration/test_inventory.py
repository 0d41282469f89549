"""Inventory on a real PostgreSQL: atomic all-or-nothing reservations under concurrency,
settlements, the stock constraint; and the service as a real process over Kafka."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from typer.testing import CliRunner

from services.inventory import store
from services.inventory.cli import app as stock_cli
from services.inventory.domain import Line, merge_lines
from services.runtime import migrate
from tests.conftest import Infra
from tests.support.harness import Proc, envelope, produce, read_all, uid, wait_for

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def inventory_url(infra: Infra) -> str:
    url = infra.db_url("paysaga_inventory")
    migrate.upgrade("inventory", url)  # idempotent; infra_up normally did it already
    return url


@pytest.fixture
async def engine(inventory_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(inventory_url, pool_size=50, max_overflow=0, pool_timeout=30)
    yield engine
    await engine.dispose()


async def _stock(engine: AsyncEngine, **levels: int) -> dict[str, str]:
    """Fresh SKUs (unique names) with the given quotas; returns name -> real sku."""
    skus = {name: uid(f"sku-{name}-") for name in levels}
    async with engine.begin() as conn:
        for name, qty in levels.items():
            assert await store.set_available(conn, skus[name], qty, NOW) is not None
    return skus


async def _reserve(
    engine: AsyncEngine, lines: list[Line], order_id: str | None = None
) -> list[str] | None:
    """Claim an order's attempt 1 and hold its lines, as a PaymentAccepted does: the
    short SKUs, None if it was claimed before."""
    order_id = order_id or uid("ord")
    async with engine.begin() as conn:
        _, claimed = await store.claim_reservation(conn, order_id, 1, uid("txn"), lines, NOW)
        return await store.hold_claimed(conn, order_id, 1, lines, NOW) if claimed else None


async def _level(engine: AsyncEngine, sku: str) -> tuple[int, int, int]:
    async with engine.connect() as conn:
        level = await store.get_stock(conn, sku)
    assert level is not None
    return level.available, level.reserved, level.sold


async def test_fifty_concurrent_reservations_of_ten_units_hold_exactly_ten(
    engine: AsyncEngine,
) -> None:
    sku = (await _stock(engine, a=10))["a"]
    results = await asyncio.gather(*(_reserve(engine, [Line(sku, 1)]) for _ in range(50)))
    assert sum(1 for r in results if r == []) == 10
    assert all(r == [sku] for r in results if r)
    assert await _level(engine, sku) == (10, 10, 0)


async def test_concurrent_multi_line_orders_never_deadlock_or_oversell(engine: AsyncEngine) -> None:
    skus = await _stock(engine, a=20, b=20, c=5)
    rng = random.Random(7)

    def order() -> list[Line]:
        # every order asks the same SKUs, listed in a random order: merge_lines sorts them
        items = [(skus["a"], 1), (skus["b"], 1), (skus["c"], 1)]
        rng.shuffle(items)
        return list(merge_lines(items))

    results = await asyncio.gather(*(_reserve(engine, order()) for _ in range(40)))
    assert sum(1 for r in results if r == []) == 5  # c has 5
    for name in ("a", "b", "c"):
        assert (await _level(engine, skus[name]))[1] == 5


async def test_a_short_line_reserves_nothing_and_names_every_short_sku(engine: AsyncEngine) -> None:
    skus = await _stock(engine, a=5, b=1)
    never_stocked = uid("sku-none-")
    lines = merge_lines([(skus["a"], 2), (skus["b"], 3), (never_stocked, 1)])
    assert await _reserve(engine, list(lines)) == sorted([skus["b"], never_stocked])
    assert await _level(engine, skus["a"]) == (5, 0, 0)
    assert await _level(engine, skus["b"]) == (1, 0, 0)


async def test_the_same_attempt_is_reserved_once(engine: AsyncEngine) -> None:
    sku = (await _stock(engine, a=5))["a"]
    order_id = uid("ord")
    assert await _reserve(engine, [Line(sku, 2)], order_id) == []
    assert await _reserve(engine, [Line(sku, 2)], order_id) is None
    assert await _level(engine, sku) == (5, 2, 0)


async def test_a_claim_returns_the_orders_reservations_as_they_were_and_claims_once(
    engine: AsyncEngine,
) -> None:
    """``claim_reservation``: in one statement, the order's reservations before it (none,
    then attempt 1's) and the claim of this attempt's — once: a second claim of the same
    attempt claims nothing and sees it."""
    sku = (await _stock(engine, a=5))["a"]
    order_id = uid("ord")
    async with engine.begin() as conn:
        first = await store.claim_reservation(conn, order_id, 1, uid("txn"), [Line(sku, 2)], NOW)
        assert first == ({}, True)
        assert await store.hold_claimed(conn, order_id, 1, [Line(sku, 2)], NOW) == []
    async with engine.begin() as conn:
        retry = await store.claim_reservation(conn, order_id, 2, uid("txn"), [Line(sku, 1)], NOW)
        assert retry == ({1: ("reserved", (Line(sku, 2),))}, True)
        # held in the claim's transaction, as a PaymentAccepted does: the database's
        # reservations and stock agree at every commit (``paysaga reconcile`` checks it)
        assert await store.hold_claimed(conn, order_id, 2, [Line(sku, 1)], NOW) == []
    async with engine.begin() as conn:
        again = await store.claim_reservation(conn, order_id, 2, uid("txn"), [Line(sku, 1)], NOW)
    assert again == ({1: ("reserved", (Line(sku, 2),)), 2: ("reserved", (Line(sku, 1),))}, False)
    assert await _level(engine, sku) == (5, 3, 0)


async def test_commit_sells_and_release_frees_once(engine: AsyncEngine) -> None:
    sku = (await _stock(engine, a=5))["a"]
    sold_order, released_order = uid("ord"), uid("ord")
    assert await _reserve(engine, [Line(sku, 2)], sold_order) == []
    assert await _reserve(engine, [Line(sku, 1)], released_order) == []
    async with engine.begin() as conn:
        held = await store.lock_reservation(conn, sold_order, 1)
        assert held == ("reserved", (Line(sku, 2),))
        await store.settle(conn, sold_order, 1, held[1], "committed", NOW)
        held = await store.lock_reservation(conn, released_order, 1)
        assert held is not None
        await store.settle(conn, released_order, 1, held[1], "released", NOW)
    assert await _level(engine, sku) == (5, 0, 2)
    async with engine.connect() as conn:
        assert (await store.lock_reservation(conn, sold_order, 1) or ("",))[0] == "committed"
        assert (await store.lock_reservation(conn, released_order, 1) or ("",))[0] == "released"


async def test_a_held_reservation_settles_at_once_and_once_of_one_line_or_several(
    engine: AsyncEngine,
) -> None:
    """``settle_held`` settles a held reservation without reading it first — one line in
    one statement, several one by one — and writes nothing for one that is not held:
    settled already (committed or released), failed, or unknown. Eight settlements of
    one reservation at once settle it once."""
    skus = await _stock(engine, a=5, b=4, c=3)
    a, b, c = skus["a"], skus["b"], skus["c"]
    one, several, released, failed = uid("ord"), uid("ord"), uid("ord"), uid("ord")
    assert await _reserve(engine, [Line(a, 2)], one) == []
    assert await _reserve(engine, merge_lines([(b, 1), (c, 2)]), several) == []
    assert await _reserve(engine, [Line(a, 1)], released) == []
    assert await _reserve(engine, [Line(c, 9)], failed) == [c]

    async def settle(order_id: str, target: Any) -> tuple[Line, ...] | None:
        async with engine.begin() as conn:
            return await store.settle_held(conn, order_id, 1, target, NOW)

    assert await settle(one, "committed") == (Line(a, 2),)
    assert set(await settle(several, "committed") or ()) == {Line(b, 1), Line(c, 2)}
    assert await settle(released, "released") == (Line(a, 1),)
    assert [await _level(engine, sku) for sku in (a, b, c)] == [(5, 0, 2), (4, 0, 1), (3, 0, 2)]
    for order_id in (one, several, released, failed, uid("ord")):
        for target in ("committed", "released"):
            assert await settle(order_id, target) is None
    assert [await _level(engine, sku) for sku in (a, b, c)] == [(5, 0, 2), (4, 0, 1), (3, 0, 2)]
    async with engine.connect() as conn:
        states = [
            (await store.lock_reservation(conn, o, 1) or ("",))[0]
            for o in (one, several, released, failed)
        ]
    assert states == ["committed", "committed", "released", "failed"]

    raced = uid("ord")
    assert await _reserve(engine, [Line(a, 3)], raced) == []
    outcomes = await asyncio.gather(*(settle(raced, "committed") for _ in range(8)))
    assert sorted(map(bool, outcomes)) == [False] * 7 + [True]
    assert await _level(engine, a) == (5, 0, 5)


async def test_the_database_refuses_more_reserved_than_available(engine: AsyncEngine) -> None:
    sku = (await _stock(engine, a=3))["a"]
    with pytest.raises(sqlalchemy.exc.IntegrityError, match="ck_stock_within_available"):
        async with engine.begin() as conn:
            await conn.execute(
                update(store.stock).where(store.stock.c.sku == sku).values(reserved=4)
            )


async def test_a_quota_below_reserved_is_not_written(engine: AsyncEngine) -> None:
    sku = (await _stock(engine, a=5))["a"]
    assert await _reserve(engine, [Line(sku, 3)]) == []
    async with engine.begin() as conn:
        assert await store.set_available(conn, sku, 2, NOW) is None
        assert (await store.set_available(conn, sku, 3, NOW)) is not None
    assert await _level(engine, sku) == (3, 3, 0)


# --- the service as a process -----------------------------------------------------------


def _events(infra: Infra, order_id: str) -> list[dict[str, Any]]:
    records = asyncio.run(read_all(infra.bootstrap, "inventory.events.v1"))
    docs = [json.loads(r.value) for r in records if r.key == order_id.encode()]
    return [d for d in docs if d["payload"]["order_id"] == order_id]


def _row(table: str, sku: str) -> list[str]:
    """The number cells of ``sku``'s row in ``stock show``'s table."""
    line = next(line for line in table.splitlines() if sku in line)
    return [cell.strip() for cell in line.split("│") if cell.strip()][1:]


def test_stock_set_then_payment_accepted_reserves_and_capture_commits(
    infra: Infra, inventory_proc: Proc
) -> None:
    sku, order_id = uid("sku-cli-"), uid("ord")
    env = {
        "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": infra.bootstrap,
        "PAYSAGA_DATABASE_URL": infra.database_url,
    }
    runner = CliRunner()
    result = runner.invoke(stock_cli, ["set", sku, "3"], env=env)
    assert result.exit_code == 0, result.output

    def shown() -> str:
        out = runner.invoke(stock_cli, ["show", sku], env=env)
        return out.output if out.exit_code == 0 else ""

    assert _row(wait_for(shown, 60, "the level applied by the service"), sku) == [
        "3",
        "0",
        "0",
        "3",
    ]
    context = {
        "order_id": order_id, "attempt": 1, "payment_intent_id": uid("pi"),
        "transaction_id": uid("txn"), "flow": "authorization", "amount": 3000,
        "currency": "EUR", "gateway": "simgw",
    }  # fmt: skip
    accepted = envelope(
        "PaymentAccepted",
        {**context, "customer_id": "cus_1", "items": [{"sku": sku, "quantity": 2}],
         "payment_method_type": "card", "brand": "visa", "last4": "4242"},
        saga_seq=1, correlation_id="corr-inv",
    )  # fmt: skip
    asyncio.run(produce(infra.bootstrap, "payments.events.v1", [(order_id, accepted)]))
    reserved = wait_for(lambda: _events(infra, order_id), 60, "StockReserved")
    assert [e["event_type"] for e in reserved] == ["StockReserved"]
    assert reserved[0]["saga_seq"] == 2
    assert reserved[0]["correlation_id"] == "corr-inv"
    assert json.loads(accepted)["event_id"] == reserved[0]["causation_id"]

    captured = envelope("PaymentCaptured", {**context, "capture_id": "cap_1"}, saga_seq=3)
    asyncio.run(produce(infra.bootstrap, "capture.events.v1", [(order_id, captured)]))
    done = wait_for(
        lambda: [e for e in _events(infra, order_id) if e["event_type"] == "StockCommitted"],
        60, "StockCommitted",
    )  # fmt: skip
    assert done[0]["payload"]["items"] == [{"sku": sku, "quantity": 2}]
    assert _row(shown(), sku) == ["3", "0", "2", "1"]  # available, reserved, sold, sellable
    assert runner.invoke(stock_cli, ["set", sku, "1"], env=env).exit_code == 1  # below sold
