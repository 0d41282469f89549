"""Webhook delivery of the gateway simulator (docs/contract.md §4).

An event's body is serialized once and those exact bytes are signed with the gateway's
first secret and delivered to the bridge in a background task, retried until the bridge
answers 2xx, with jittered exponential backoff capped at ``delivery_backoff_max_s``. By
default it never gives up; ``delivery_give_up_s`` (``PAYSAGA_DELIVERY_GIVE_UP_S``)
optionally abandons a delivery after that many seconds. Each delivery attempt is
re-signed with its own timestamp, as real gateways do, so a late retry does not fall
outside the bridge's tolerance; the first attempt carries the returned signature.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from urllib.parse import quote

import httpx

from services.gatewaysim.models import Transaction
from services.gatewaysim.settings import GatewaySimSettings
from services.runtime.retry import backoff_s
from services.runtime.signature import sign

log = logging.getLogger("paysaga.gatewaysim")


def delivery_delay(
    settings: GatewaySimSettings, attempts: int, elapsed_s: float, jitter: float
) -> float | None:
    """Seconds to wait before the next webhook delivery after ``attempts`` failed ones,
    ``elapsed_s`` after the first: exponential from ``delivery_backoff_base_s``, capped at
    ``delivery_backoff_max_s``, times 0.5..1 (``jitter`` in [0, 1)). None — give up —
    only when ``delivery_give_up_s`` is set and the next attempt would come after it."""
    delay = backoff_s(
        attempts, settings.delivery_backoff_base_s, settings.delivery_backoff_max_s, jitter
    )
    give_up = settings.delivery_give_up_s
    return None if give_up is not None and elapsed_s + delay > give_up else delay


class Webhooks:
    """Signs event bodies and delivers them, one background task per event; the state of
    each delivery is kept on its ``Transaction``."""

    def __init__(self, settings: GatewaySimSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.tasks: set[asyncio.Task[None]] = set()
        self.http: httpx.AsyncClient | None = None
        self.rng = random.Random()

    def sign(self, raw: bytes, at: int) -> str:
        s = self.settings
        return sign(s.gateway_secrets[s.gateway_id][0], at, raw)

    def deliver(self, txn: Transaction, raw: bytes, signature: str) -> None:
        """Start delivering ``raw`` (first attempt signed with ``signature``)."""
        txn.delivery = "pending"
        task = asyncio.get_running_loop().create_task(self._deliver(txn, raw, signature))
        self.tasks.add(task)  # keep a reference: the loop holds tasks weakly
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, txn: Transaction, raw: bytes, signature: str) -> None:
        s = self.settings
        url = f"{s.bridge_url.rstrip('/')}/webhooks/{quote(s.gateway_id, safe='')}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.http is None:
            self.http = httpx.AsyncClient()
        while True:
            txn.delivery_attempts += 1
            if txn.delivery_attempts > 1:
                signature = self.sign(raw, int(self.clock()))
            headers = {"content-type": "application/json", "paysaga-signature": signature}
            try:
                response = await self.http.post(
                    url, content=raw, headers=headers, timeout=s.delivery_timeout_s
                )
            except httpx.HTTPError as exc:
                outcome = repr(exc)
            else:
                if response.is_success:
                    txn.delivery = "delivered"
                    return
                outcome = f"HTTP {response.status_code}"
            delay = delivery_delay(
                s, txn.delivery_attempts, loop.time() - started, self.rng.random()
            )
            if delay is None:
                txn.delivery = "abandoned"
                log.error("webhook %s abandoned: %s", txn.event_id, outcome)
                return
            log.warning("webhook %s attempt %d: %s", txn.event_id, txn.delivery_attempts, outcome)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
