"""deploy/prometheus and deploy/grafana as data: rules, dashboard queries, metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "paysaga.json"

#: exported by the monitor service (docs/contract.md §3.5), which may not be in the stack yet
MONITOR_METRICS = frozenset(
    {
        "paysaga_sagas_stalled",
        "paysaga_saga_outcomes_total",
        "paysaga_saga_duration_seconds_bucket",
        "paysaga_saga_duration_seconds_sum",
        "paysaga_saga_duration_seconds_count",
    }
)
MONITOR_PORT = 8085

_METRIC = re.compile(r"\b(paysaga_[a-z0-9_]+|up)\b")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.M)


def rules() -> list[dict[str, Any]]:
    doc: dict[str, Any] = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def scrape_jobs() -> dict[str, int]:
    """Job name -> the port it scrapes."""
    doc: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    jobs = {}
    for job in doc["scrape_configs"]:
        [target] = [t for c in job["static_configs"] for t in c["targets"]]
        jobs[job["job_name"]] = int(target.rsplit(":", 1)[1])
    return jobs


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def used_metric_names() -> dict[str, set[str]]:
    """Metric name -> where it is used (alert names, dashboard panels)."""
    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics text can hold: a histogram's _bucket, _sum, _count."""
    names = set()
    for name, kind in _TYPE.findall(exposition):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


#: the README's metric reference: one table per process under "### Metrics"
_REFERENCE_HEADING = "### Metrics"
_ROW = re.compile(r"^\| `(paysaga_[a-z0-9_]+)` \| (counter|gauge|histogram) \| ([^|]*) \|", re.M)


def documented_metrics() -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """Process (the word a ``####`` heading of the README's Metrics section starts with)
    -> metric name (a counter's with ``_total``) -> (type, labels)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n{_REFERENCE_HEADING}\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    documented: dict[str, dict[str, tuple[str, frozenset[str]]]] = {}
    for part in section.split("\n#### ")[1:]:
        process = part.split(maxsplit=1)[0]
        rows = documented.setdefault(process, {})
        for name, kind, labels in _ROW.findall(part):
            assert name not in rows, f"{name} documented twice under {process}"
            rows[name] = (kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
    return documented
