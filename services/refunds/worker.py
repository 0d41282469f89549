"""The refunds worker: takes ``pending`` compensations to the gateway and records the
outcomes.

Per round (see ``domain``): claim (short transaction, ``FOR UPDATE SKIP LOCKED``, state
``in_flight`` with a lease) → look up and/or ``POST …/void`` / ``…/refund`` with the
compensation's one idempotency key (no transaction open) → transaction B: the fenced
outcome and its event in the outbox. Rows whose worker died mid-call are reclaimed
after the lease and looked up first.
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
from services.refunds import domain, store
from services.refunds.handlers import REFUNDS_TOPIC
from services.runtime.gateway_client import (
    GatewayClient,
    GatewayNotFoundError,
    GatewayOutcome,
    GatewayProtocolError,
    GatewayUnavailableError,
)
from services.runtime.intents import Clock, utc_now

log = logging.getLogger("paysaga.refunds.worker")


@dataclasses.dataclass(frozen=True)
class RefundsMetrics:
    rounds: Counter
    failures: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RefundsMetrics:
        return cls(
            rounds=Counter(
                "paysaga_compensation_rounds_total",
                "Compensation worker rounds by action and resolution: succeeded, failed, "
                "retry, lease_lost",
                ["action", "outcome"],
                registry=registry,
            ),
            failures=Counter(
                "paysaga_compensation_failures_total",
                "Compensations that ended in CompensationFailed (NEEDS_RECONCILIATION)",
                ["action", "reason"],
                registry=registry,
            ),
        )


def event_for(claimed: store.Claimed, resolution: domain.Resolution) -> BaseModel | None:
    """The event a resolution emits (a retry emits none)."""
    ctx = claimed.context.model_dump()
    claim = claimed.claim
    match resolution:
        case domain.Succeeded(refund_id=refund_id) if claim.action == "refund":
            assert refund_id is not None  # the domain names every successful refund
            return events.RefundSucceeded(**ctx, refund_id=refund_id, reason=claim.reason)
        case domain.Succeeded():
            return events.AuthorizationVoided(**ctx, reason=claim.reason)
        case domain.Failed(reason=reason):
            return events.CompensationFailed(**ctx, action=claim.action, reason=reason)
        case domain.Retry():
            return None


class RefundsWorker:
    def __init__(
        self,
        engine: AsyncEngine,
        gateway: GatewayClient,
        policy: domain.RetryPolicy,
        metrics: RefundsMetrics,
        *,
        lease: timedelta,
        batch: int = 8,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.engine, self.gateway, self.policy, self.metrics = engine, gateway, policy, metrics
        self.lease, self.batch, self.clock = lease, batch, clock
        self.rng = rng or random.Random()
        # a round must end well inside its lease (see the capture worker)
        self.round_budget_s = lease.total_seconds() * 0.8

    async def tick(self) -> bool:
        """Run one round for each due compensation (concurrently); False if none was due."""
        claimed = await store.claim_due(self.engine, self.clock(), self.batch, self.lease)
        if not claimed:
            return False
        results = await asyncio.gather(*(self._round(c) for c in claimed), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors[1:]:
            log.error("compensation round failed", exc_info=error)
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
            self.engine, claimed, resolution, event_for(claimed, resolution), REFUNDS_TOPIC,
            self.clock(),
        )  # fmt: skip
        outcome = type(resolution).__name__.lower() if ok else "lease_lost"
        self.metrics.rounds.labels(claim.action, outcome).inc()
        if ok and isinstance(resolution, domain.Failed):
            self.metrics.failures.labels(claim.action, resolution.reason).inc()
        log.info("%s %s round %d: %s", claim.action, claim.transaction_id, claim.attempt,
                 resolution if ok else "lease lost")  # fmt: skip

    async def _decide(self, claimed: store.Claimed) -> domain.Resolution:
        claim = claimed.claim
        first = domain.first_step(claim)
        step = await self._lookup(claim) if isinstance(first, domain.Lookup) else first
        if not isinstance(step, domain.Call):
            return step
        try:
            outcome = await self._call(claimed)
        except GatewayProtocolError as exc:
            # outside the contract (e.g. 409): the look-up next round tells what happened
            return self._retry(claim, f"http_{exc.status_code}")
        return domain.after_call(claim, outcome, self.clock(), self.policy, self.rng.random())

    async def _call(self, claimed: store.Claimed) -> GatewayOutcome:
        claim, key = claimed.claim, claimed.idempotency_key
        if claim.action == "void":
            return await self.gateway.void(claim.transaction_id, key)
        return await self.gateway.refund(
            claim.transaction_id, claim.amount, claim.currency, claim.reason, key
        )

    async def _lookup(self, claim: domain.Claim) -> domain.Call | domain.Resolution:
        try:
            payment = await self.gateway.get_payment(claim.transaction_id)
        except GatewayNotFoundError:
            return domain.Failed("not_found")
        except (GatewayUnavailableError, GatewayProtocolError) as exc:
            return self._retry(claim, f"lookup: {exc}")
        return domain.after_lookup(claim, payment)

    def _retry(self, claim: domain.Claim, error: str) -> domain.Retry | domain.Failed:
        return domain.retry_or_fail(
            claim.attempt, error, self.clock(), self.policy, self.rng.random()
        )
