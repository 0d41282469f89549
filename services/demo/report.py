"""What the demo's load phase shows and checks, each read from where a user would look:
the orders' final statuses (per path), the inventory's stock rows (per ticket type),
the audit trail (rejected confirmations), the dead-letter topics, the payments
service's counters (duplicates), and ``paysaga reconcile``."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path as FsPath
from typing import TypeVar

from rich.table import Table

from services.demo.load import FINAL, PATHS, Load, Path, absorbed_duplicates
from services.devclient import DevClient
from services.runtime.cli_dlq import Filters, read_dead_letters

OUT_OF_STOCK = "out_of_stock"
T = TypeVar("T")


@dataclasses.dataclass
class Report:
    tables: list[Table] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)

    def check(self, ok: bool, failure: str) -> str:
        if not ok:
            self.failures.append(failure)
        return "[green]✓[/]" if ok else "[red]✗[/]"


def build(client: DevClient, load: Load) -> Report:
    report = Report()
    _outcomes(report, load)
    _tickets(report, client, load)
    _rejections(report, client, load)
    _dead_letters(report, client, load)
    _latency(report, load)
    _reconcile(report, client, load)
    return report


def _ran_out(load: Load, sku: str) -> bool:
    return load.quotas[sku] < load.demand(sku)


def _expected(load: Load, path: Path, sku: str, status: str, reason: str | None) -> bool:
    """The path's outcome — or, for a ticket type that sold out, its out-of-stock one."""
    if status == path.expect:
        return True
    return _ran_out(load, sku) and status == path.out_of_stock and reason == OUT_OF_STOCK


def _outcomes(report: Report, load: Load) -> None:
    statuses = FINAL
    table = Table(
        "path",
        "expected",
        "orders",
        *statuses,
        "not final",
        "of which out of stock",
        "✓",
        title="outcomes by path",
    )
    for path in PATHS:
        mine = [o for o in load.orders if o.path == path]
        if not mine:
            continue
        counts = [sum(o.status == s for o in mine) for s in statuses]
        unexpected = [
            o for o in mine if o.error or not _expected(load, path, o.sku, o.status, o.reason)
        ]
        oos = sum(o.reason == OUT_OF_STOCK for o in mine)
        detail = ", ".join(
            f"{o.order_id} {o.status} {o.reason or ''} {o.error}" for o in unexpected[:3]
        )
        ok = report.check(not unexpected, f"{path.name}: {len(unexpected)} unexpected ({detail})")
        sells_out = any(_ran_out(load, o.sku) for o in mine)
        table.add_row(
            path.name,
            path.expect + (f" | {path.out_of_stock} (sold out)" if sells_out else ""),
            str(len(mine)),
            *(str(c or "") for c in counts),
            str(sum(o.status not in FINAL for o in mine) or ""),
            str(oos or ""),
            ok,
        )
    report.tables.append(table)


def _tickets(report: Report, client: DevClient, load: Load) -> None:
    rows = client.db(
        "inventory",
        "SELECT sku, available, reserved, sold FROM stock WHERE sku = ANY(%s)",
        list(load.quotas),
    )
    stock = {sku: (available, reserved, sold) for sku, available, reserved, sold in rows}
    table = Table(
        "ticket type",
        "quota",
        "orders",
        "sold",
        "held",
        "paid orders",
        "out of stock",
        "✓",
        title="tickets (inventory's stock rows)",
    )
    for sku, quota in load.quotas.items():
        available, reserved, sold = stock.get(sku, (0, 0, 0))
        demand = load.demand(sku)
        mine = [o for o in load.orders if o.sku == sku]
        paid = sum(o.status == "PAID_CONFIRMED" for o in mine)
        oos = sum(o.reason == OUT_OF_STOCK for o in mine)
        # only orders that end paid buy a limited ticket: the quota sells out exactly
        keeps = sum(o.path.expect == "PAID_CONFIRMED" for o in mine)
        ok = report.check(
            available == quota
            and sold + reserved <= available
            and reserved == 0
            and sold == paid == min(quota, keeps)
            and oos == max(0, keeps - quota),
            f"{sku}: quota {quota}, stock row {available}/{reserved} held/{sold} sold,"
            f" {paid} paid, {oos} out of stock",
        )
        table.add_row(
            sku.split("-", 1)[1],
            str(available),
            str(demand),
            str(sold),
            str(reserved),
            str(paid),
            str(oos),
            ok,
        )
    report.tables.append(table)


def _settled(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 20) -> T:
    """``read()`` until ``done`` with it (or the deadline): counts written asynchronously."""
    deadline = time.monotonic() + timeout
    found = read()
    while not done(found) and time.monotonic() < deadline:
        time.sleep(0.3)
        found = read()
    return found


def _rejections(report: Report, client: DevClient, load: Load) -> None:
    """Rejected confirmations by reason, from the audit trail (the audit of a record
    rejected before its body is trusted carries the bridge's record key), and the
    webhook copies payments' inbox absorbed."""
    ids = [o.order_id for o in load.orders]

    def audited() -> dict[str, int]:
        rows = client.db(
            "orders",
            "SELECT reason, count(*) FROM audit_log WHERE action = 'confirmation'"
            " AND outcome = 'rejected'"
            " AND (order_id = ANY(%s) OR details->>'record_key' = ANY(%s)) GROUP BY reason",
            ids,
            ids,
        )
        return {str(reason): int(count) for reason, count in rows}

    found = _settled(audited, lambda f: f == load.rejected_sent)
    table = Table(
        "reason", "sent", "counted", "✓", title="rejected confirmations by reason (audit trail)"
    )
    for reason in sorted({*load.rejected_sent, *found}):
        sent, got = load.rejected_sent.get(reason, 0), found.get(reason, 0)
        ok = report.check(sent == got, f"rejected {reason}: {sent} sent, {got} audited")
        table.add_row(reason, str(sent), str(got), ok)

    def absorbed() -> int | None:
        total = absorbed_duplicates(client)
        return None if total is None else total - load.duplicates_before

    copies = _settled(absorbed, lambda got: got is None or got >= load.duplicates_sent)
    ok = report.check(
        copies == load.duplicates_sent,
        f"webhook copies: {load.duplicates_sent} sent, {copies} absorbed as duplicates",
    )
    counted = "-" if copies is None else str(copies)
    table.add_row("(duplicate copy: absorbed, not judged)", str(load.duplicates_sent), counted, ok)
    report.tables.append(table)


def _dead_letters(report: Report, client: DevClient, load: Load) -> None:
    since = datetime.fromtimestamp(load.started_at, UTC)
    letters = asyncio.run(read_dead_letters(client.bootstrap, Filters(since=since)))
    ok = report.check(not letters, f"{len(letters)} dead letter(s) since the load started")
    report.lines.append(f"dead letters since the load started: {len(letters)} {ok}")


def _percentile(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def _latency(report: Report, load: Load) -> None:
    table = Table(
        "orders",
        "n",
        "p50",
        "p95",
        "p99",
        "max",
        title="end-to-end latency: webhook sent → final status on orders.status.v1",
    )
    groups = [("all", load.orders), (PATHS[0].name, [o for o in load.orders if o.path == PATHS[0]])]
    for name, orders in groups:
        values = [v for o in orders if (v := o.latency_s) is not None]
        if values:
            cells = [f"{_percentile(values, q) * 1000:.0f} ms" for q in (50, 95, 99)]
            table.add_row(name, str(len(values)), *cells, f"{max(values) * 1000:.0f} ms")
    report.tables.append(table)


def _reconcile(report: Report, client: DevClient, load: Load) -> None:
    """``paysaga reconcile --gateway`` over the load's orders (the stock rules are global)."""
    paysaga = FsPath(sys.executable).parent / "paysaga"
    orders = [arg for o in load.orders for arg in ("--order", o.order_id)]
    done = subprocess.run(
        [str(paysaga), "reconcile", "--gateway", *orders],
        env={**client.env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = (done.stdout + done.stderr).strip().splitlines()
    notices = Counter(line.split()[1] for line in lines if line.startswith("notice:"))
    out = "\n".join(line for line in lines if not line.startswith("notice:"))
    ok = report.check(done.returncode == 0, f"paysaga reconcile: {out}")
    report.lines.append(f"paysaga reconcile --gateway (the load's orders): {out} {ok}")
    for rule, count in notices.items():  # informational: no money held
        report.lines.append(f"  and {count} notice(s) {rule}")
