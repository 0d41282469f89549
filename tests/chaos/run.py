"""``make chaos``: every chaos scenario at scale (``PAYSAGA_CHAOS_SCALE``, default 48:
about 1,150 orders a scenario, over 10,000 a run), plus the cluster scenarios
(``-m cluster``) where they exist; prints scenario, orders, faults injected, violations
and time, and exits non-zero on any violation or failed scenario."""

from __future__ import annotations

import json
import os
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
    targets = ["tests/chaos/test_saga_chaos.py"]
    if (REPO / "tests" / "cluster").is_dir():
        targets += ["tests/cluster", "-m", "cluster or chaos"]
    code = devstack.run_tests(["-q", "-p", "no:cacheprovider", *targets, *argv])
    lines = [json.loads(ln) for ln in report.read_text().splitlines() if ln.strip()]
    report.unlink(missing_ok=True)
    print(table(lines))
    if any(ln["violations"] for ln in lines):
        for ln in lines:
            for v in ln.get("first", []):
                print(f"  {ln['scenario']}: {v}")
        return 1
    return code


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
