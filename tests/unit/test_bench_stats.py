"""The pure parts of ``make bench`` (benchmarks/stats.py), so the benchmark does not rot
between runs: percentiles, the rate ladder, the step verdict, the result shape."""

from __future__ import annotations

import copy
import itertools

import pytest

from benchmarks import stats


def test_percentiles_interpolate_between_ranks_and_summary_rounds() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.percentile([], 50) is None
    with pytest.raises(ValueError, match=r"0\.\.100"):
        stats.percentile(values, 101)
    assert stats.summary([3.0, 1.0, 2.0]) == {
        "n": 3,
        "p50": 2.0,
        "p95": 2.9,
        "p99": 3.0,
        "max": 3.0,
    }
    assert stats.summary([])["p99"] is None


def test_rate_ladder_rises_with_readable_steps() -> None:
    assert stats.rate_ladder(2, 2, 4) == [2.0, 4.0, 8.0, 16.0]
    ladder = stats.rate_ladder(2, 1.5, 8)
    assert ladder[:5] == [2.0, 3.0, 4.5, 6.8, 10.0]
    assert all(b > a for a, b in itertools.pairwise(ladder))
    with pytest.raises(ValueError, match="factor"):
        stats.rate_ladder(2, 1, 3)


def test_a_growing_backlog_ends_the_ladder_and_a_steady_one_does_not() -> None:
    steady = [(t / 2, 3.0 + (t % 2)) for t in range(40)]
    growing = [(t / 2, 2.0 * t) for t in range(40)]  # +4 orders/s of backlog
    assert not stats.lag_growing(steady, rate=20)
    assert stats.lag_growing(growing, rate=20)
    assert stats.verdict(100, 100, False, 120.0) == (True, False)
    assert stats.verdict(100, 100, False, 400.0) == (True, True)  # p99 over: last step
    assert stats.verdict(100, 90, False, 120.0) == (False, True)  # orders left unfinished
    assert stats.verdict(100, 100, True, 120.0) == (False, True)


def _step(rate: float, sustained: bool, p99: float) -> dict[str, object]:
    return {
        "offered_per_s": rate,
        "orders": 10,
        "completed": 10,
        "achieved_per_s": rate,
        "sustained": sustained,
        "lag_growing": not sustained,
        "end_to_end_ms": {"n": 10, "p50": p99 / 2, "p95": p99, "p99": p99, "max": p99},
        "steps_ms": {},
        "cpu_ms_per_order": {"total": 1.0},
    }


def test_best_rates_ratios_and_the_result_shape() -> None:
    steps = [_step(2, True, 100), _step(4, True, 300), _step(8, False, 900)]
    assert stats.best_rates(steps) == {
        "sustained_per_s": 4,
        "sustained_p99_within_limit_per_s": 2,
    }
    assert stats.ratios(4, {"kafka_chain": 400.0, "psycopg_step": None}) == {
        "kafka_chain": 0.01,
        "psycopg_step": None,
    }
    limit = {"events_per_s": 1.0, "orders_per_s": 1.0, "cpu_ms_per_event": {"total": 1.0}}
    ladders = [
        {"instances": n, "steps": steps, **stats.best_rates(steps), "ratios": {}} for n in (1, 2)
    ]
    doc = {
        "benchmark": "saga",
        "date": "2026-01-01T00:00:00Z",
        "quick": True,
        "machine": {},
        "limits": {"kafka_chain": limit, "psycopg_step": limit},
        "saga": ladders,
        "bridge": {},
    }
    stats.check_result(doc)
    broken = copy.deepcopy(doc)
    del broken["saga"][1]["steps"][0]["end_to_end_ms"]
    with pytest.raises(ValueError, match="end_to_end_ms"):
        stats.check_result(broken)
    broken = copy.deepcopy(doc)
    del broken["saga"][1]["instances"]
    with pytest.raises(ValueError, match="instances"):
        stats.check_result(broken)
    with pytest.raises(ValueError, match="list of ladders"):
        stats.check_result(doc | {"saga": {"steps": steps}})
    with pytest.raises(ValueError, match="bridge"):
        stats.check_result({k: v for k, v in doc.items() if k != "bridge"})


def test_a_group_is_settled_once_every_member_has_partitions() -> None:
    assert stats.group_settled((0, "Stable", [9, 9]), members=2)
    assert not stats.group_settled((0, "Stable", [18]), members=2)  # the second not joined
    assert not stats.group_settled((0, "CompletingRebalance", [9, 9]), members=2)
    assert not stats.group_settled((0, "Stable", [18, 0]), members=2)  # nothing assigned yet
    assert not stats.group_settled((16, "Stable", [9, 9]), members=2)  # NOT_COORDINATOR
    assert not stats.group_settled(None, members=1)  # not described at all
    assert stats.group_settled((0, "Stable", [18]), members=1)


def test_a_later_run_on_the_same_day_never_overwrites_a_saved_one() -> None:
    assert stats.free_stem(set(), "2026-12-02", quick=False) == "2026-12-02"
    saved = {"2026-12-01", "2026-12-02", "2026-12-02b"}
    assert stats.free_stem(saved, "2026-12-02", quick=False) == "2026-12-02c"
    assert stats.free_stem(saved, "2026-12-01", quick=False) == "2026-12-01b"
    assert stats.free_stem(saved, "2026-12-02", quick=True) == "2026-12-02-quick"
    assert stats.free_stem({"2026-12-02-quick"}, "2026-12-02", quick=True) == "2026-12-02b-quick"
    full = {"d", *(f"d{c}" for c in "bcdefghijklmnopqrstuvwxyz")}
    with pytest.raises(ValueError, match="every name for d is taken"):
        stats.free_stem(full, "d", quick=False)
