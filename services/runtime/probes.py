"""The HTTP probes every paysaga process serves — the services' shell
(``service.py``) and the bridge alike: ``/healthz`` (alive), ``/readyz`` (200 when
every check passes, else 503, with the checks and any reasons) and ``/metrics``
(Prometheus text from the process's registry)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

#: the checks (name → passed) and the reasons behind a failed one, if it gives any
Readiness = Callable[[], Awaitable[tuple[dict[str, bool], list[str]]]]


def add_probes(
    app: FastAPI,
    name: str,
    registry: CollectorRegistry,
    readiness: Readiness,
    *,
    in_schema: bool = True,
) -> None:
    """Serve the probes of process ``name`` on ``app``."""

    @app.get("/healthz", include_in_schema=in_schema)
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "service": name}

    @app.get("/readyz", include_in_schema=in_schema)
    async def readyz(response: Response) -> dict[str, Any]:
        checks, reasons = await readiness()
        ready = all(checks.values())
        response.status_code = 200 if ready else 503
        body: dict[str, Any] = {"ready": ready, "checks": checks}
        if reasons:
            body["reasons"] = reasons
        return body

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
