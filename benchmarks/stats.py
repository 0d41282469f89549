"""The pure parts of ``make bench``: percentiles, the offered-rate ladder, the verdict of
one step (sustained or not), the shape of the result document. No I/O here: the unit
test (tests/unit/test_bench_stats.py) checks them without a stack."""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from typing import Any

#: a step whose p99 end to end passes this is the last one (the issue's latency target)
P99_LIMIT_MS = 250.0
#: a step is sustained when this share of its orders finished within the drain window …
MIN_COMPLETED = 0.99
#: … and the backlog (confirmations published, not yet PAID_CONFIRMED) did not grow by
#: more than this share of the offered rate per second over the step's second half
MAX_BACKLOG_GROWTH = 0.05

#: keys every result document has (checked before it is saved, and by the unit test)
RESULT_KEYS = ("benchmark", "date", "quick", "machine", "limits", "saga", "bridge")
#: keys of each saga ladder (``saga`` is a list of them: one per instance count)
LADDER_KEYS = (
    "instances",
    "steps",
    "sustained_per_s",
    "sustained_p99_within_limit_per_s",
    "ratios",
)
STEP_KEYS = (
    "offered_per_s",
    "orders",
    "completed",
    "achieved_per_s",
    "sustained",
    "lag_growing",
    "end_to_end_ms",
    "steps_ms",
    "cpu_ms_per_order",
)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks
    (numpy's default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, p50/p95/p99 and max of ``values`` (rounded to 0.1)."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 1)

    return {
        "n": len(values),
        "p50": r(percentile(values, 50)),
        "p95": r(percentile(values, 95)),
        "p99": r(percentile(values, 99)),
        "max": r(max(values) if values else None),
    }


def rate_ladder(start: float, factor: float, steps: int) -> list[float]:
    """Offered rates (orders/s) of the steps: ``start`` times ``factor`` per step, each
    rounded to two significant digits so the table reads well (2, 3, 4.5, 6.8, 10, …)."""
    if start <= 0 or factor <= 1 or steps < 1:
        raise ValueError("need start > 0, factor > 1, steps >= 1")
    rates: list[float] = []
    for i in range(steps):
        raw = start * factor**i
        digits = 1 - math.floor(math.log10(raw))
        rate = round(raw, digits)
        if rates and rate <= rates[-1]:
            rate = rates[-1] * factor
        rates.append(float(rate))
    return rates


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def lag_growing(backlog: Sequence[tuple[float, float]], rate: float) -> bool:
    """Whether the backlog samples (seconds into the step, orders in flight) keep
    growing: the slope over the second half exceeds ``MAX_BACKLOG_GROWTH`` times the rate
    (and half an order per second, so a backlog of a few orders is not growth)."""
    if not backlog:
        return False
    end = backlog[-1][0]
    second_half = [(t, b) for t, b in backlog if t >= end / 2]
    return slope(second_half) > max(0.5, MAX_BACKLOG_GROWTH * rate)


def verdict(
    orders: int,
    completed: int,
    growing: bool,
    p99_ms: float | None,
    p99_limit_ms: float = P99_LIMIT_MS,
) -> tuple[bool, bool]:
    """(sustained, last step): sustained when nearly every order finished and the
    backlog did not grow; the ladder stops after a step that is not sustained or whose
    p99 passed the limit."""
    sustained = orders > 0 and completed >= MIN_COMPLETED * orders and not growing
    over = p99_ms is None or p99_ms > p99_limit_ms
    return sustained, (not sustained) or over


def best_rates(
    steps: Sequence[Mapping[str, Any]], p99_limit_ms: float = P99_LIMIT_MS
) -> dict[str, float | None]:
    """The highest offered rate sustained, and the highest sustained within the p99 limit."""
    sustained = [s for s in steps if s["sustained"]]
    within = [s for s in sustained if (s["end_to_end_ms"]["p99"] or math.inf) <= p99_limit_ms]
    return {
        "sustained_per_s": max((s["offered_per_s"] for s in sustained), default=None),
        "sustained_p99_within_limit_per_s": max((s["offered_per_s"] for s in within), default=None),
    }


def ratios(saga_per_s: float | None, limits: Mapping[str, float | None]) -> dict[str, float | None]:
    """Saga orders/s ÷ each limit's orders/s: the figure that holds on a noisy machine."""
    return {
        name: (round(saga_per_s / limit, 4) if saga_per_s and limit else None)
        for name, limit in limits.items()
    }


def group_settled(described: tuple[int, str, Sequence[int]] | None, members: int) -> bool:
    """Whether a consumer group, as described (error code, state, partitions assigned
    to each member), is stable with ``members`` members, each with partitions."""
    if described is None:
        return False
    error, state, assigned = described
    return error == 0 and state == "Stable" and len(assigned) == members and all(assigned)


def check_result(doc: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``doc`` has the result document's shape."""
    missing = [k for k in RESULT_KEYS if k not in doc]
    if missing:
        raise ValueError(f"result lacks {missing}")
    ladders = doc["saga"]
    if not isinstance(ladders, list) or not ladders:
        raise ValueError("saga must be a list of ladders, one per instance count")
    for ladder in ladders:
        lacking = [k for k in LADDER_KEYS if k not in ladder]
        if lacking:
            raise ValueError(f"saga ladder lacks {lacking}")
    for step in (s for ladder in ladders for s in ladder["steps"]):
        lacking = [k for k in STEP_KEYS if k not in step]
        if lacking:
            raise ValueError(f"saga step lacks {lacking}")
        if set(step["end_to_end_ms"]) != {"n", "p50", "p95", "p99", "max"}:
            raise ValueError("end_to_end_ms must be a summary()")
    for name in ("kafka_chain", "psycopg_step"):
        limit = doc["limits"][name]
        if not {"events_per_s", "orders_per_s", "cpu_ms_per_event"} <= set(limit):
            raise ValueError(f"limit {name} lacks its rates")


def free_stem(saved: set[str], day: str, quick: bool) -> str:
    """The name a run saves under: the first of ``<day>``, ``<day>b``, ``<day>c`` …
    (``-quick`` appended for a quick run) not among the ``saved`` ones, so a second run
    on the same day never overwrites the first."""
    tail = "-quick" if quick else ""
    for suffix in ("", *string.ascii_lowercase[1:]):
        if (stem := f"{day}{suffix}{tail}") not in saved:
            return stem
    raise ValueError(f"every name for {day}{tail} is taken")
