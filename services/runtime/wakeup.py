"""Waking a worker at commit: ``notify`` in the transaction that makes work (delivered
only if it commits, and only then), ``listen`` and ``wait_for_notification`` on the
worker's own autocommit connection, and ``WorkLoop``, which runs a worker's ``tick``
while it finds work and then waits for the next notification or ``poll_s``.

The poll picks up what no notification announces: retries whose time has come,
expired leases, notifications lost while the listening connection was down. The
outbox relay (``relay.py``) and every intent worker wait this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime import deferred
from services.runtime.errors import is_transient, said
from services.runtime.retry import backoff_s

log = logging.getLogger("paysaga.work_loop")


def notify_statement(channel: str) -> str:
    """The statement that wakes the workers listening on ``channel`` once the
    transaction it runs in commits (for a plain psycopg connection, as in the CLI)."""
    return f"NOTIFY {channel}"


async def notify(conn: AsyncConnection, channel: str) -> None:
    """Wake the workers listening on ``channel`` once ``conn``'s transaction commits
    (said with what a batch's transaction collected, ``deferred``)."""
    await deferred.wake(conn, channel)


class WorkLoop:
    """Runs until ``stop``. A transient failure (database gone) is logged and retried
    with backoff; anything else is a bug and ends the loop (and the process, which a
    supervisor restarts): intents stay in their table, so nothing is lost."""

    def __init__(
        self,
        name: str,
        conninfo: str,
        channel: str,
        tick: Callable[[], Awaitable[bool]],
        poll_s: float = 0.5,
        backoff_max_s: float = 10.0,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name, self.conninfo, self.channel = name, conninfo, channel
        self.tick, self.poll_s, self.backoff_max_s = tick, poll_s, backoff_max_s
        #: on stop, waits for the work ``tick`` started to end (intent rounds in flight)
        self.drain = drain
        self._rng = random.Random()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            if self.drain is not None:
                try:
                    await self.drain()
                except Exception as exc:  # noqa: BLE001 - stopping: its row is reclaimed after the lease
                    log.warning("%s worker: a round ended in %s", self.name, said(exc))

    async def _run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True
                ) as listener:
                    await listen(listener, self.channel)
                    while not stop.is_set():
                        while not stop.is_set() and await self.tick():
                            pass
                        failures = 0
                        await wait_for_notification(listener, self.poll_s)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                delay = backoff_s(failures + 1, 0.5, self.backoff_max_s, self._rng.random())
                log.warning("%s worker: %s; retrying in %.1fs", self.name, said(exc), delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)


async def listen(listener: psycopg.AsyncConnection[object], channel: str) -> None:
    """Subscribe ``listener`` (an autocommit connection) to ``channel``."""
    await listener.execute(f"LISTEN {channel}")


async def wait_for_notification(listener: psycopg.AsyncConnection[object], poll_s: float) -> None:
    """Return at the next notification on ``listener`` or after ``poll_s``, having
    drained the notifications that piled up meanwhile: one pass serves them all."""
    with contextlib.suppress(TimeoutError):
        async for _ in listener.notifies(timeout=poll_s, stop_after=1):
            break
    with contextlib.suppress(TimeoutError):
        async for _ in listener.notifies(timeout=0.001):
            pass
