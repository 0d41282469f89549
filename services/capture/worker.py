"""The capture worker: takes ``pending`` intents to the gateway and records outcomes.

Per round (see ``domain``): claim (short transaction, ``FOR UPDATE SKIP LOCKED``, state
``in_flight`` with a lease) → look up and/or ``POST …/capture`` with the idempotency key
``capture:{transaction_id}`` (no transaction open) → transaction B: the fenced outcome
and its event in the outbox. The worker is also the capture service's janitor: it
reclaims rows whose worker died mid-call (look-up first) and owns authorization expiry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import events
from services.capture import domain, store
from services.capture.handlers import CAPTURE_TOPIC
from services.runtime.gateway_client import (
    GatewayClient,
    GatewayNotFoundError,
    GatewayProtocolError,
    GatewayUnavailableError,
)
from services.runtime.intents import Clock, utc_now

log = logging.getLogger("paysaga.capture.worker")


@dataclasses.dataclass(frozen=True)
class CaptureMetrics:
    rounds: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CaptureMetrics:
        return cls(
            rounds=Counter(
                "paysaga_capture_rounds_total",
                "Capture worker rounds by resolution: captured, declined, expired, failed, "
                "retry, lease_lost",
                ["outcome"],
                registry=registry,
            )
        )


def event_for(claimed: store.Claimed, resolution: domain.Resolution) -> BaseModel | None:
    """The event a resolution emits (a retry emits none)."""
    ctx = claimed.context.model_dump()
    match resolution:
        case domain.Captured(capture_id=capture_id):
            return events.PaymentCaptured(**ctx, capture_id=capture_id)
        case domain.CaptureDeclined(decline_code=code):
            return events.CaptureDeclined(**ctx, decline_code=code)
        case domain.Expired():
            return events.AuthorizationExpired(**ctx)
        case domain.Failed(reason=reason):
            return events.CaptureFailed(**ctx, reason=reason)
        case domain.Retry():
            return None


_OUTCOMES: dict[type, str] = {
    domain.Captured: "captured",
    domain.CaptureDeclined: "declined",
    domain.Expired: "expired",
    domain.Failed: "failed",
    domain.Retry: "retry",
}


class CaptureWorker:
    def __init__(
        self,
        engine: AsyncEngine,
        gateway: GatewayClient,
        policy: domain.CapturePolicy,
        metrics: CaptureMetrics,
        *,
        lease: timedelta,
        batch: int = 8,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.engine, self.gateway, self.policy, self.metrics = engine, gateway, policy, metrics
        self.lease, self.batch, self.clock = lease, batch, clock
        self.rng = rng or random.Random()
        # a round must end well inside its lease, or another worker could reclaim the
        # row while this one still calls the gateway
        self.round_budget_s = lease.total_seconds() * 0.8

    async def tick(self) -> bool:
        """Run one round for each due intent (concurrently); False if none was due."""
        claimed = await store.claim_due(self.engine, self.clock(), self.batch, self.lease)
        if not claimed:
            return False
        results = await asyncio.gather(*(self._round(c) for c in claimed), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors[1:]:
            log.error("capture round failed", exc_info=error)
        if errors:
            raise errors[0]  # its row stays in_flight and is reclaimed after the lease
        return True

    async def _round(self, claimed: store.Claimed) -> None:
        claim = claimed.claim
        try:
            async with asyncio.timeout(self.round_budget_s):
                resolution = await self._decide(claimed)
        except TimeoutError:
            resolution = self._retry(claim, "round_timeout")
        ok = await store.resolve(
            self.engine, claimed, resolution, event_for(claimed, resolution), CAPTURE_TOPIC,
            self.clock(),
        )  # fmt: skip
        outcome = _OUTCOMES[type(resolution)] if ok else "lease_lost"
        self.metrics.rounds.labels(outcome).inc()
        log.info("capture %s round %d: %s", claim.transaction_id, claim.attempt,
                 resolution if ok else "lease lost")  # fmt: skip

    async def _decide(self, claimed: store.Claimed) -> domain.Resolution:
        claim = claimed.claim
        first = domain.first_step(claim, self.clock(), self.policy)
        step = await self._lookup(claim) if isinstance(first, domain.Lookup) else first
        if not isinstance(step, domain.CallCapture):
            return step
        try:
            outcome = await self.gateway.capture(
                claim.transaction_id, claim.amount, claim.currency, claimed.idempotency_key
            )
        except GatewayProtocolError as exc:
            # outside the contract (e.g. 409): the look-up next round tells what happened
            return self._retry(claim, f"http_{exc.status_code}")
        return domain.after_capture(claim, outcome, self.clock(), self.policy, self.rng.random())

    async def _lookup(self, claim: domain.Claim) -> domain.CallCapture | domain.Resolution:
        try:
            payment = await self.gateway.get_payment(claim.transaction_id)
        except GatewayNotFoundError:
            return domain.Failed("transaction_not_found")
        except (GatewayUnavailableError, GatewayProtocolError) as exc:
            return self._retry(claim, f"lookup: {exc}")
        return domain.after_lookup(claim, payment, self.clock(), self.policy)

    def _retry(self, claim: domain.Claim, error: str) -> domain.Retry | domain.Failed:
        return domain.retry_or_fail(
            claim.attempt, error, self.clock(), self.policy.retry, self.rng.random()
        )
