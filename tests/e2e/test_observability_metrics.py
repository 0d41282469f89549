"""Every metric an alert rule or a dashboard panel uses is one the running services export.

prometheus_client writes the HELP and TYPE lines of every registered metric, labelled
or not, before its first sample, so a fresh stack shows every name."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services import devstack
from services.devclient import wait_for
from tests.e2e.conftest import Stack, new_id
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


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Labels -> value of every sample named ``name`` in a /metrics text."""
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def counted(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for k, v in samples(text, name).items() if want <= k)


def test_a_paid_order_shows_in_step_latency_and_gateway_calls(stack: Stack) -> None:
    order_id, intent, sku = new_id("ord"), new_id("pi"), new_id("sku")
    stack.set_stock(sku, 5)
    total = stack.place_order(order_id, intent=intent, items=[(sku, 1, 1500)])
    stack.wait_status(order_id, "PENDING_PAYMENT")
    stack.pay(order_id, intent, total)
    stack.wait_status(order_id, "PAID_CONFIRMED")

    def observed() -> dict[str, str] | None:
        texts = scrape(stack)
        steps = {
            "payments": counted(
                texts["payments"], "paysaga_step_latency_seconds_count",
                event_type="gateway.confirmations.v1",
            ),
            "inventory": counted(
                texts["inventory"], "paysaga_step_latency_seconds_count",
                event_type="PaymentAccepted",
            ),
            "orders": counted(
                texts["orders"], "paysaga_step_latency_seconds_count",
                event_type="PaymentCaptured",
            ),
        }  # fmt: skip
        captures = counted(
            texts["capture"], "paysaga_gateway_call_seconds_count",
            operation="capture", outcome="succeeded",
        )  # fmt: skip
        return texts if all(steps.values()) and captures >= 1 else None

    texts = wait_for(observed, timeout=30, what="step latency and gateway call samples")
    # the gauges read from the stores are exported with a value
    unmatched = samples(texts["payments"], "paysaga_unmatched_payments_open")
    assert {dict(k)["state"] for k in unmatched} == {"parked", "refund_pending"}
    for service in ("payments", "inventory", "capture", "refunds", "orders"):
        assert samples(texts[service], "paysaga_dead_letters_open").keys() == {
            frozenset({("service", service)})
        }, service
    assert "paysaga_reconcile_violations" in prom.exported_names(texts["orders"])


def test_every_exported_metric_is_in_the_readme_reference(stack: Stack) -> None:
    documented = {n for rows in prom.documented_metrics().values() for n in rows}
    exported = {
        name
        for text in scrape(stack).values()
        for name, _ in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    }
    # prometheus_client's companion of a counter or histogram: when its series began
    created = {n for n in exported if n.removesuffix("_created") + "_total" in documented}
    created |= {n for n in exported if n.removesuffix("_created") in documented - {n}}
    assert "paysaga_step_latency_seconds" in exported
    assert exported - created - documented == set()
