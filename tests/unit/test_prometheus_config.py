"""deploy/prometheus and deploy/grafana: valid for promtool, alerts that fire, runbooks.

promtool comes with Prometheus (Debian/Ubuntu: `apt-get install prometheus`); the tests
that need it are skipped, saying so, where it is not installed. The metric names are
checked against the running services in tests/e2e/test_observability_metrics.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services import devstack
from tests.support import prometheus as prom

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian/Ubuntu: apt-get install prometheus)"
)
ALERT_TESTS = Path(__file__).resolve().parents[1] / "data" / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


def readme_anchors() -> set[str]:
    """GitHub's anchors of the README's headings."""
    text = (prom.REPO / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@needs_promtool
def test_alert_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(prom.ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(prom.rules())} rules found" in result.stdout


@needs_promtool
def test_scrape_configuration_passes_promtool_check_config() -> None:
    result = promtool("check", "config", str(prom.SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_each_alert_fires_on_its_trouble_and_not_on_a_healthy_stack() -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text(encoding="utf-8")))
    assert tested == {rule["alert"] for rule in prom.rules()}
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(("}]}]}),
        encoding="utf-8",
    )
    assert promtool("check", "rules", str(broken)).returncode != 0


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    exprs = prom.dashboard_exprs()
    as_rules = [{"record": f"paysaga:dashboard_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": as_rules}]}), "utf-8")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_summary_and_a_runbook_section_in_the_readme() -> None:
    anchors = readme_anchors()
    for rule in prom.rules():
        annotations = rule["annotations"]
        assert annotations["summary"], rule["alert"]
        assert annotations["runbook"] == f"README.md#{rule['alert'].lower()}", rule["alert"]
        assert rule["alert"].lower() in anchors, f"README has no section {rule['alert']}"


def test_every_service_with_metrics_is_scraped_on_its_port() -> None:
    # the gateway simulator stands in for the gateway and exports no metrics
    expected = {sp.name: sp.port for sp in devstack.SERVICE_PROCESSES if sp.name != "gatewaysim"}
    expected.setdefault("monitor", prom.MONITOR_PORT)
    assert prom.scrape_jobs() == expected


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (prom.REPO / "deploy/grafana/provisioning/datasources/paysaga.yml").read_text("utf-8")
    )
    [datasource] = provisioned["datasources"]
    text = prom.DASHBOARD.read_text(encoding="utf-8")
    assert set(re.findall(r'"uid": "([^"]+)"', text)) - {"paysaga"} == {datasource["uid"]}
