"""The README's metric reference (Monitoring → Metrics) is the metrics the code defines:
every ``Counter``/``Gauge``/``Histogram`` of prometheus_client under ``services/`` is
documented under its process with its type and labels, and every documented metric is
defined. (tests/e2e/test_observability_metrics.py checks the running services' /metrics
against the same table.)"""

from __future__ import annotations

import ast

from tests.support import prometheus as prom

SERVICES = prom.REPO / "services"
KINDS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram"}


def _imports_prometheus_client(tree: ast.Module) -> set[str]:
    return {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
        for alias in node.names
        if alias.name in KINDS
    }


def _labels(call: ast.Call) -> frozenset[str]:
    node = call.args[2] if len(call.args) > 2 else None
    for kw in call.keywords:
        if kw.arg == "labelnames":
            node = kw.value
    if node is None:
        return frozenset()
    assert isinstance(node, ast.List | ast.Tuple), ast.dump(call)
    return frozenset(ast.literal_eval(node))


def defined_metrics() -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """Process (``runtime`` for services/runtime, else the service's folder) -> name ->
    (type, labels), from the source."""
    defined: dict[str, dict[str, tuple[str, frozenset[str]]]] = {}
    for path in sorted(SERVICES.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        kinds = _imports_prometheus_client(tree)
        process = path.relative_to(SERVICES).parts[0]
        for call in ast.walk(tree):
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id in kinds
                and call.args
                and isinstance(call.args[0], ast.Constant)
            ):
                continue
            kind = KINDS[call.func.id]
            name = str(call.args[0].value)
            if kind == "counter" and not name.endswith("_total"):
                name += "_total"  # prometheus_client appends it
            defined.setdefault(process, {})[name] = (kind, _labels(call))
    return defined


def test_every_defined_metric_is_documented_under_its_process_and_only_those() -> None:
    defined, documented = defined_metrics(), prom.documented_metrics()
    assert documented == defined


def test_the_reader_finds_what_the_code_defines() -> None:
    defined = defined_metrics()
    assert defined["runtime"]["paysaga_records_total"] == (
        "counter",
        frozenset({"service", "topic", "outcome"}),
    )
    assert defined["monitor"]["paysaga_saga_outcomes_total"][0] == "counter"
    assert defined["orders"]["paysaga_orders_held_events"] == ("gauge", frozenset())
    assert set(defined) >= {"runtime", "payments", "capture", "refunds", "orders", "bridge"}


def test_every_metric_name_says_its_unit_and_is_prefixed() -> None:
    for process, metrics in defined_metrics().items():
        for name in metrics:
            assert name.startswith("paysaga_"), (process, name)


def test_no_metric_is_labelled_by_an_unbounded_id() -> None:
    for process, metrics in defined_metrics().items():
        for name, (_, labels) in metrics.items():
            assert not labels & {"order_id", "event_id", "transaction_id", "key"}, (process, name)
