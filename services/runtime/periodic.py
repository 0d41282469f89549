"""A background worker that runs one step every ``interval_s`` seconds: the gauges read
from a store (held events, unmatched payments) and the periodic reconcile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from services.runtime.service import Worker

log = logging.getLogger("paysaga.periodic")


def every(what: str, interval_s: float, step: Callable[[], Awaitable[None]]) -> Worker:
    """Run ``step`` at once, then every ``interval_s`` until the stop event; a failing
    step is logged and tried again at the next interval (a metric must not take the
    service down)."""

    async def run(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await step()
            except Exception as exc:  # noqa: BLE001 -- logged; the next interval tries again
                log.warning("%s failed: %r", what, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    return run
