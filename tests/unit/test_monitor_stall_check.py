"""The monitor's stall check walks the open sagas, not the day of final markers its table
keeps: a pass costs what is in flight, not what was sold today. The whole table is walked
once at the start, every ``WHOLE_TABLE_EVERY_S`` (pruning old markers) and after the table
changed under the check (a recovery, a rebalance)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry

from schemas.contract import OrderStatus
from services.monitor import domain, stall_check
from services.monitor.domain import Deadlines, MinuteOutcomes, Saga
from services.monitor.stall_check import StallCheck
from services.monitor.web import MonitorMetrics


class _Table(dict[bytes, dict[str, Any]]):
    """The faust table's mapping, counting the rows a pass reads."""

    reads = 0

    def get(self, key: bytes, default: Any = None) -> Any:  # type: ignore[override]
        self.reads += 1
        return super().get(key, default)


class _Sent:
    def __init__(self) -> None:
        self.keys: list[bytes] = []

    async def send(self, *, key: bytes, value: bytes, headers: Any) -> Any:
        self.keys.append(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _Producer:
    async def flush(self) -> None:
        return None


class _App:
    producer = _Producer()


def _row(status: OrderStatus, since: float) -> dict[str, Any]:
    return Saga(status=status, version=1, since=since, event_id="ev").to_dict()


def _check(table: _Table, sent: _Sent) -> tuple[StallCheck, MonitorMetrics]:
    metrics = MonitorMetrics(CollectorRegistry())
    deadlines = Deadlines(default_s=60)
    return StallCheck(_App(), table, sent, deadlines, metrics, MinuteOutcomes()), metrics  # type: ignore[arg-type]


def _stalled(metrics: MonitorMetrics, status: OrderStatus) -> float:
    return float(metrics.stalled.labels(status.value)._value.get())


def test_a_pass_walks_the_open_sagas_after_the_first_walks_the_whole_table() -> None:
    now = time.time()
    table = _Table({f"paid{i}".encode(): _row(OrderStatus.PAID_CONFIRMED, now) for i in range(500)})
    table[b"stuck"] = _row(OrderStatus.INVENTORY_RESERVED, now - 120)  # past its 60 s
    table[b"moving"] = _row(OrderStatus.PAYMENT_AUTHORIZED, now)
    sent = _Sent()
    check, metrics = _check(table, sent)

    asyncio.run(check.run())
    assert table.reads == 502  # the first pass: the whole table
    assert sent.keys == [b"stuck"]
    assert _stalled(metrics, OrderStatus.INVENTORY_RESERVED) == 1

    table.reads = 0
    asyncio.run(check.run())
    assert table.reads == 2  # the open sagas only
    assert sent.keys == [b"stuck"]  # reported once
    assert _stalled(metrics, OrderStatus.INVENTORY_RESERVED) == 1

    # statuses applied since: one order paid, one new and already past its deadline
    table[b"stuck"] = _row(OrderStatus.PAID_CONFIRMED, now)
    check.noted(b"stuck", Saga.from_dict(table[b"stuck"]))
    table[b"new"] = _row(OrderStatus.PENDING_PAYMENT, now - 120)
    check.noted(b"new", Saga.from_dict(table[b"new"]))
    table.reads = 0
    asyncio.run(check.run())
    assert table.reads == 2  # "moving" and "new"
    assert sent.keys == [b"stuck", b"new"]
    assert _stalled(metrics, OrderStatus.INVENTORY_RESERVED) == 0
    assert _stalled(metrics, OrderStatus.PENDING_PAYMENT) == 1


def test_the_whole_table_is_walked_again_after_a_rebalance_and_every_while() -> None:
    now = time.time()
    old = now - domain.FINAL_KEPT_S - 10
    table = _Table({b"paid_long_ago": _row(OrderStatus.PAID_CONFIRMED, old)})
    table[b"open"] = _row(OrderStatus.PAYMENT_AUTHORIZED, now)
    check, _ = _check(table, _Sent())
    asyncio.run(check.run())
    assert b"paid_long_ago" not in table  # pruned by the whole walk

    # a row that came with a rebalance, never noted
    table[b"handed_over"] = _row(OrderStatus.INVENTORY_RESERVED, now)
    check.forget_open()
    table.reads = 0
    asyncio.run(check.run())
    assert table.reads == 2
    assert check.open == {b"open", b"handed_over"}

    table[b"paid_long_ago"] = _row(OrderStatus.PAID_CONFIRMED, old)
    check._whole_walked -= stall_check.WHOLE_TABLE_EVERY_S  # its time has come
    asyncio.run(check.run())
    assert b"paid_long_ago" not in table
