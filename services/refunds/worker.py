"""The refunds worker: takes ``pending`` compensations to the gateway and records the
outcomes.

Per round (see ``domain``): claim (short transaction, ``FOR UPDATE SKIP LOCKED``, state
``in_flight`` with a lease) → look up and/or ``POST …/void`` / ``…/refund`` with the
compensation's one idempotency key (no transaction open) → transaction B: the fenced
outcome and its event in the outbox. Rows whose worker died mid-call are reclaimed
after the lease and looked up first. A compensation whose outcome is still unknown when
its rounds are spent raises the alarm once and goes on being looked up (``domain``).
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from schemas import events
from services.refunds import domain, store
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.intents.store import Claimed
from services.runtime.intents.worker import LookupIntentWorker
from services.runtime.topics import REFUNDS_TOPIC


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
                "retry, stalled (rounds spent, outcome unknown, still looked up), lease_lost",
                ["action", "outcome"],
                registry=registry,
            ),
            failures=Counter(
                "paysaga_compensation_failures_total",
                "Compensations that raised CompensationFailed (NEEDS_RECONCILIATION), once "
                "each: failed for good, or reason retry_budget_exhausted (still looked up)",
                ["action", "reason"],
                registry=registry,
            ),
        )


class RefundsWorker(
    LookupIntentWorker[domain.Claim, domain.Resolution, domain.RetryPolicy, RefundsMetrics]
):
    """Void and refund rounds."""

    intents = store.INTENTS
    channel = store.CHANNEL
    topic = REFUNDS_TOPIC
    after_lookup = staticmethod(domain.after_lookup)
    after_call = staticmethod(domain.after_call)
    retry_later = staticmethod(domain.retry_later)

    @staticmethod
    def event_for(
        claimed: Claimed[domain.Claim], resolution: domain.Resolution
    ) -> BaseModel | None:
        """The event a resolution emits (a retry emits none). ``CompensationFailed`` is
        emitted once per compensation: not again for a row whose alarm was raised."""
        ctx = claimed.context.model_dump()
        claim = claimed.claim
        match resolution:
            case domain.Succeeded(refund_id=refund_id) if claim.action == "refund":
                assert refund_id is not None  # the domain names every successful refund
                return events.RefundSucceeded(**ctx, refund_id=refund_id, reason=claim.reason)
            case domain.Succeeded():
                return events.AuthorizationVoided(**ctx, reason=claim.reason)
            case domain.Failed(reason=reason):
                if claim.alerted:
                    return None
                return events.CompensationFailed(**ctx, action=claim.action, reason=reason)
            case domain.Stalled():
                return events.CompensationFailed(
                    **ctx, action=claim.action, reason="retry_budget_exhausted"
                )
            case domain.Retry():
                return None

    def report(
        self, claimed: Claimed[domain.Claim], resolution: domain.Resolution, stored: bool
    ) -> None:
        claim = claimed.claim
        outcome = type(resolution).__name__.lower() if stored else "lease_lost"
        self.metrics.rounds.labels(claim.action, outcome).inc()
        alarm = self.event_for(claimed, resolution)
        if stored and isinstance(alarm, events.CompensationFailed):
            self.metrics.failures.labels(claim.action, alarm.reason).inc()

    @staticmethod
    def round_name(claim: domain.Claim) -> str:
        return f"{claim.action} {claim.transaction_id} round {claim.attempt}"

    def first_step(
        self, claimed: Claimed[domain.Claim]
    ) -> domain.Lookup | domain.Call | domain.Resolution:
        return domain.first_step(claimed.claim)

    def not_found(self) -> domain.Resolution:
        return domain.Failed("not_found")

    async def call(self, claimed: Claimed[domain.Claim]) -> GatewayOutcome:
        claim, key = claimed.claim, claimed.idempotency_key
        if claim.action == "void":
            return await self.gateway.void(claim.transaction_id, key)
        return await self.gateway.refund(
            claim.transaction_id, claim.amount, claim.currency, claim.reason, key
        )
