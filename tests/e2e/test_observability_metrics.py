"""Every metric an alert rule or a dashboard panel uses is one the running services export.

prometheus_client writes the HELP and TYPE lines of every registered metric, labelled
or not, before its first sample, so a fresh stack shows every name."""

from __future__ import annotations

import httpx

from services import devstack
from tests.e2e.conftest import Stack
from tests.support import prometheus as prom


def scrape(stack: Stack) -> dict[str, str]:
    """Service -> its /metrics text, for every stack service that serves one."""
    texts = {}
    for sp in devstack.SERVICE_PROCESSES:
        port = stack.env[f"PAYSAGA_{sp.name.upper()}_PORT"]
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        if response.status_code == 200:
            texts[sp.name] = response.text
    return texts


def test_every_metric_used_by_an_alert_or_a_panel_is_exported(stack: Stack) -> None:
    texts = scrape(stack)
    exported = {"up"}  # Prometheus's own, per target
    for text in texts.values():
        exported |= prom.exported_names(text)
    if "monitor" not in texts:  # not in the stack yet: its names are the contract's
        exported |= prom.MONITOR_METRICS
    missing = {
        name: sorted(where)
        for name, where in prom.used_metric_names().items()
        if name not in exported
    }
    assert missing == {}


def test_every_service_serving_metrics_is_scraped(stack: Stack) -> None:
    scraped = set(prom.scrape_jobs()) - {"monitor"}
    assert set(scrape(stack)) - {"monitor"} == scraped
