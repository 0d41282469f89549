"""The monitor's HTTP side: its metrics and the pages faust's web server serves on
``PAYSAGA_MONITOR_PORT`` — ``/healthz``, ``/readyz`` (``Monitor.readiness``), ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from services.monitor import domain


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.stalled = Gauge(
            "paysaga_sagas_stalled",
            "Orders in a status past its deadline (reported on saga.stalled.v1)",
            ["status"],
            registry=registry,
        )
        self.outcomes = Counter(
            "paysaga_saga_outcomes",
            "Saga attempts that reached a final status",
            ["status"],
            registry=registry,
        )
        self.last_minute = Gauge(
            "paysaga_saga_outcomes_last_minute",
            "Final outcomes whose status changed in the last complete minute (tumbling)",
            ["status"],
            registry=registry,
        )
        self.duration = Histogram(
            "paysaga_saga_duration_seconds",
            "From PENDING_PAYMENT to a final status",
            buckets=(1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 21600, 86400),
            registry=registry,
        )
        self.reported = Counter(
            "paysaga_saga_stalled_reports",
            "SagaStalled events emitted",
            ["status"],
            registry=registry,
        )
        self.records = Counter(
            "paysaga_monitor_records",
            "orders.status.v1 records read: applied, ignored (stale or duplicate), invalid",
            ["outcome"],
            registry=registry,
        )
        for s in domain.OPEN:
            self.stalled.labels(s.value)
            self.reported.labels(s.value)
        for s in domain.FINAL:
            self.outcomes.labels(s.value)
            self.last_minute.labels(s.value)


def add_pages(
    app: faust.App, registry: CollectorRegistry, readiness: Callable[[], dict[str, bool]]
) -> None:
    """``/healthz``, ``/readyz`` (503 unless every check of ``readiness`` holds) and
    ``/metrics`` on the faust ``app``."""

    # faust calls a page as ``get(view, request)``
    @app.page("/healthz")
    async def healthz(view: Any, request: Any) -> Any:
        return view.json({"status": "alive", "service": "monitor"})

    @app.page("/readyz")
    async def readyz(view: Any, request: Any) -> Any:
        checks = readiness()
        ready = all(checks.values())
        return view.json({"ready": ready, "checks": checks}, status=200 if ready else 503)

    @app.page("/metrics")
    async def metrics(view: Any, request: Any) -> Any:
        body = generate_latest(registry)
        return view.bytes(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
