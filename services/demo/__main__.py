"""``make demo``: bring up the local stack, push one hand-made order through each path of
the saga (a table with each order's history and gateway ledger), then a load of a small
conference's ticket sales through every path at once (``DEMO_ORDERS``, default 200;
quotas that sell out) with a progress bar, and print what it did: outcomes by path,
tickets sold against their quotas, rejected confirmations by reason, dead letters,
end-to-end latency and ``paysaga reconcile``. Exits non-zero if any check fails. Stops
what it started (a stack already running from ``make up`` is left running); with
``KEEP=1`` the stack stays up and the operator console's address is printed last."""

from __future__ import annotations

import os
import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services import devstack
from services.demo import load, report, scenarios
from services.devclient import DevClient
from services.runtime.terminal import make_console

console = make_console()
DEFAULT_ORDERS = 200


def load_phase(client: DevClient, n: int) -> bool:
    started = time.monotonic()
    console.print(
        f"\nload: {n} ticket orders of a small conference through {len(load.PATHS)} paths,"
        f" {load.RATE:.0f} started a second, at most {load.IN_FLIGHT} under way"
    )
    columns = (TextColumn("orders final"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("orders", total=n)
        done = load.run(client, n, on_final=lambda o: progress.advance(bar))
    elapsed = time.monotonic() - started
    console.print(f"{n} orders final in {elapsed:.1f}s ({n / elapsed:.1f} orders/s)")
    found = report.build(client, done)
    for table in found.tables:
        console.print(table)
    for line in found.lines:
        console.print(line)
    for failure in found.failures:
        console.print(f"[red]check failed:[/] {failure}")
    return not found.failures


def main() -> None:
    started = time.monotonic()
    profile = devstack.PROFILES["dev"]
    was_running = devstack.status("dev").get("orders", "").startswith("running")
    keep = os.environ.get("KEEP", "") not in ("", "0")
    n = int(os.environ.get("DEMO_ORDERS") or DEFAULT_ORDERS)
    env = devstack.stack_env(profile)
    ok = False
    try:
        devstack.up("dev")
        console.print(
            f"stack ready in {time.monotonic() - started:.1f}s;"
            f" running {len(scenarios.SCENARIOS)} orders"
        )
        client = DevClient(env["PAYSAGA_KAFKA_BOOTSTRAP_SERVERS"], env["PAYSAGA_DATABASE_URL"], env)
        at = time.monotonic()
        ok = scenarios.run(client)
        console.print(f"{len(scenarios.SCENARIOS)} orders in {time.monotonic() - at:.1f}s")
        ok = (n <= 0 or load_phase(client, n)) and ok
    except devstack.StackError as exc:  # one sentence saying why, not a traceback
        console.print(f"[red]{exc}[/red]")
        sys.exit(1)
    finally:
        if not was_running and not keep:
            devstack.down("dev")
    console.print(
        f"{'all' if ok else 'NOT all'} orders reached their expected outcome"
        f"{'' if ok else ' or a check failed'} ({time.monotonic() - started:.1f}s in all)"
    )
    if keep:
        console.print(
            f"the stack stays up (make down stops it); operator console:"
            f" http://127.0.0.1:{env['PAYSAGA_ORDERS_PORT']}/console/"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
