"""``make chaos``: every chaos scenario at scale (``PAYSAGA_CHAOS_SCALE``, default 48:
about 1,150 orders a scenario, over 10,000 a run) on the one-broker test stack, then the
cluster scenarios (``tests/cluster``, ``-m cluster``) on the 3-broker test cluster
(``PAYSAGA_KAFKA_BROKERS=3``); prints scenario, orders, faults injected, violations and
time, and exits non-zero on any violation or failed scenario.

Each stack gets fresh databases: the stored consumer positions of one stack's topics
mean nothing on the other's (they would read as positions beyond the log end)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from services import devstack

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    os.environ.setdefault("PAYSAGA_CHAOS_SCALE", "48")
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        report = Path(f.name)
    os.environ["PAYSAGA_CHAOS_REPORT"] = str(report)
    args = ["-q", "-p", "no:cacheprovider"]
    # the environment as given: run_tests puts the one-broker stack's PAYSAGA_* settings
    # (its database URL among them) into this process's, which would tell the cluster
    # run that a database is configured elsewhere and must not be started
    given = dict(os.environ)
    code = devstack.run_tests([*args, "tests/chaos/test_saga_chaos.py", *argv])
    if (REPO / "tests" / "cluster").is_dir():
        _fresh_databases()
        env = {**given, "PAYSAGA_KAFKA_BROKERS": "3"}
        cluster = [sys.executable, "-m", "services.cli", "dev", "test", *args, "tests/cluster"]
        code = (
            subprocess.run([*cluster, "-m", "cluster", *argv], env=env, check=False).returncode
            or code
        )
        _fresh_databases()
    lines = [json.loads(ln) for ln in report.read_text().splitlines() if ln.strip()]
    report.unlink(missing_ok=True)
    print(table(lines))
    if any(ln["violations"] for ln in lines):
        for ln in lines:
            for v in ln.get("first", []):
                print(f"  {ln['scenario']}: {v}")
        return 1
    return code


def _fresh_databases() -> None:
    """Drop the (stopped) test profile's PostgreSQL folder: the next stack starts empty."""
    home = devstack.pg_home(devstack.PROFILES["test"])
    devstack.pg_down(devstack.PROFILES["test"])
    shutil.rmtree(home, ignore_errors=True)


def table(lines: list[dict[str, object]]) -> str:
    head = ("scenario", "orders", "faults injected", "violations", "time")
    rows = [
        (str(ln["scenario"]), str(ln["orders"]), str(ln["faults"]), str(ln["violations"]),
         f"{ln['seconds']} s")
        for ln in lines
    ]  # fmt: skip
    total = (
        "total",
        str(sum(int(str(ln["orders"])) for ln in lines)),
        str(sum(int(str(ln["faults"])) for ln in lines)),
        str(sum(int(str(ln["violations"])) for ln in lines)),
        f"{sum(float(str(ln['seconds'])) for ln in lines):.0f} s",
    )
    widths = [max(len(r[i]) for r in (head, *rows, total)) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        cells = zip(r, widths, strict=True)
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *map(fmt, rows), rule, fmt(total)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
