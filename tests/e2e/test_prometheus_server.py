"""The real Prometheus server against the test stack: deploy/prometheus/prometheus.yml
scrapes every service, and the shipped rules of deploy/prometheus/alerts.yml fire on a
saga stuck because capture is down and resolve once the order is paid.

Prometheus runs with a copy of prometheus.yml whose targets are the test stack's ports
and whose intervals are 1 s; the rules are the shipped file itself. The stall deadline
is the stack's (tests/e2e/conftest.py). Skipped, saying so, where the Prometheus server
is not installed (Debian/Ubuntu: ``apt-get install prometheus``)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from services import devstack
from services.devclient import wait_for
from tests.e2e.conftest import Stack
from tests.e2e.test_monitor import CAPTURE, PROFILE, RESERVED_DEADLINE_S
from tests.e2e.test_saga import order_with_stock
from tests.support import prometheus as prom
from tests.support.harness import LOGS, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="the Prometheus server is not installed (Debian/Ubuntu: apt-get install prometheus)",
    ),
]

#: the alert of alerts.yml on paysaga_sagas_stalled, and the status the test stalls
STALLED_ALERT = "PaysagaSagasStalled"
STATUS = "INVENTORY_RESERVED"
T = TypeVar("T")


def stack_config(stack: Stack) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the test stack's ports (a job is named after
    its service), 1 s intervals, and its rule files by absolute path."""
    doc: dict[str, Any] = yaml.safe_load(prom.SCRAPE_CONFIG.read_text(encoding="utf-8"))
    doc["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    doc["rule_files"] = [str(prom.PROMETHEUS / name) for name in doc["rule_files"]]
    for job in doc["scrape_configs"]:
        port = stack.env[f"PAYSAGA_{job['job_name'].upper()}_PORT"]
        for static in job["static_configs"]:
            static["targets"] = [f"{t.rsplit(':', 1)[0]}:{port}" for t in static["targets"]]
    return doc


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server on a free port, its data in a temporary folder; its base URL."""
    assert PROMETHEUS is not None
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(stack_config(stack)), encoding="utf-8")
    url = f"http://127.0.0.1:{free_port()}"
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / "prometheus.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited: {tail(log)}"
            try:
                return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, what="Prometheus ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:])


def api(url: str, path: str, **params: str) -> Any:
    response = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


def target_health(url: str) -> dict[str, str]:
    """Job -> the health of its target (``up``, ``down``, ``unknown``)."""
    targets = api(url, "targets", state="active")["activeTargets"]
    return {t["labels"]["job"]: t["health"] for t in targets}


def stalled_gauge(url: str) -> float | None:
    """``paysaga_sagas_stalled{status=STATUS}`` as Prometheus holds it now (None: no sample)."""
    result = api(url, "query", query=f'sum(paysaga_sagas_stalled{{status="{STATUS}"}})')["result"]
    return float(result[0]["value"][1]) if result else None


def stalled_alert(url: str) -> dict[str, Any] | None:
    """The active STALLED_ALERT for STATUS, if any."""
    found = [
        a
        for a in api(url, "alerts")["alerts"]
        if a["labels"]["alertname"] == STALLED_ALERT and a["labels"].get("status") == STATUS
    ]
    assert len(found) <= 1, found
    return found[0] if found else None


def evaluated_at(url: str) -> float:
    """When Prometheus last evaluated STALLED_ALERT's rule (epoch seconds; 0: never)."""
    [rule] = [
        r
        for group in api(url, "rules", type="alert")["groups"]
        for r in group["rules"]
        if r["name"] == STALLED_ALERT
    ]
    assert rule["health"] in {"ok", "unknown"}, rule
    return datetime.fromisoformat(rule["lastEvaluation"]).timestamp()


def at_baseline(alert: dict[str, Any] | None, baseline: float) -> bool:
    """The alert for STATUS is resolved, or fires only for the ``baseline`` orders that
    earlier tests of the session left stalled in STATUS."""
    if alert is None:
        return True
    return baseline > 0 and alert["state"] == "firing" and float(alert["value"]) <= baseline


def settle(fetch: Callable[[], T], ok: Callable[[T], bool], timeout: float, what: str) -> T:
    """Poll ``fetch`` until ``ok`` holds for what it returns (which may be falsy, like a
    gauge at 0); on timeout the failure shows the last value seen."""
    seen: list[T] = []

    def check() -> tuple[T] | None:
        seen[:] = [fetch()]
        return (seen[0],) if ok(seen[0]) else None

    try:
        return wait_for(check, timeout=timeout, what=what)[0]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen[-1] if seen else None!r}") from None


def test_prometheus_scrapes_every_service_and_fires_the_stalled_saga_alert(
    stack: Stack, prometheus: str
) -> None:
    [rule] = [r for r in prom.rules() if r["alert"] == STALLED_ALERT]
    jobs = set(prom.scrape_jobs())
    assert jobs == {sp.name for sp in devstack.SERVICE_PROCESSES} - {"gatewaysim"}
    settle(
        lambda: target_health(prometheus),
        lambda health: health == dict.fromkeys(jobs, "up"),
        timeout=30,
        what="every paysaga job up",
    )
    # orders left in STATUS by earlier tests of the session stay stalled: the baseline
    baseline = settle(
        lambda: stalled_gauge(prometheus),
        lambda value: value is not None,
        timeout=30,
        what="Prometheus holding the monitor's stalled gauge",
    )
    assert baseline is not None
    held = time.time()
    settle(
        lambda: evaluated_at(prometheus),
        lambda at: at > held,
        timeout=10,
        what=f"{STALLED_ALERT} evaluated on the gauge",
    )
    settle(
        lambda: stalled_alert(prometheus),
        lambda alert: at_baseline(alert, baseline),
        timeout=10,
        what=f"{STALLED_ALERT} for {STATUS} not firing before the stall (baseline {baseline})",
    )

    capture_pid = PROFILE.root / "pids" / f"{CAPTURE.name}.pid"
    assert devstack.stop_pid(capture_pid, f"-m {CAPTURE.module}")
    try:
        order_id, intent, _, total = order_with_stock(stack, 5)
        stack.pay(order_id, intent, total)
        stack.wait_status(order_id, STATUS)
        settle(
            lambda: target_health(prometheus).get("capture"),
            lambda health: health == "down",
            timeout=15,
            what="the capture job down while capture is stopped",
        )
        alert = settle(
            lambda: stalled_alert(prometheus),
            lambda a: a is not None and a["state"] == "firing" and float(a["value"]) > baseline,
            timeout=RESERVED_DEADLINE_S + 20,
            what=f"{STALLED_ALERT} firing for {order_id} in {STATUS}",
        )
        assert alert is not None
        assert alert["labels"] == {
            "alertname": STALLED_ALERT,
            "status": STATUS,
            **rule["labels"],
        }
        assert f"sit in {STATUS} past their deadline" in alert["annotations"]["summary"]
        assert alert["annotations"]["runbook"] == rule["annotations"]["runbook"]
        assert (stalled_gauge(prometheus) or 0) > baseline
    finally:
        devstack.services_up(PROFILE, stack.env)

    stack.wait_status(order_id, "PAID_CONFIRMED")
    settle(
        lambda: stalled_gauge(prometheus),
        lambda value: value is not None and value <= baseline,
        timeout=20,
        what="the stalled gauge falling once the order is paid",
    )
    settle(
        lambda: stalled_alert(prometheus),
        lambda alert: at_baseline(alert, baseline),
        timeout=20,
        what=f"{STALLED_ALERT} for {STATUS} resolved (baseline {baseline})",
    )
    settle(
        lambda: target_health(prometheus).get("capture"),
        lambda health: health == "up",
        timeout=15,
        what="the capture job up again",
    )
