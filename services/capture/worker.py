"""The capture worker: takes ``pending`` intents to the gateway and records outcomes.

Per round (see ``domain``): claim (short transaction, ``FOR UPDATE SKIP LOCKED``, state
``in_flight`` with a lease) → look up and/or ``POST …/capture`` with the idempotency key
``capture:{transaction_id}`` (no transaction open) → transaction B: the fenced outcome
and its event in the outbox. The worker is also the capture service's janitor: it
reclaims rows whose worker died mid-call (look-up first) and owns authorization expiry.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from schemas import events
from services.capture import domain, store
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.intents.store import Claimed
from services.runtime.intents.worker import LookupIntentWorker
from services.runtime.topics import CAPTURE_TOPIC


@dataclasses.dataclass(frozen=True)
class CaptureMetrics:
    rounds: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> CaptureMetrics:
        return cls(
            rounds=Counter(
                "paysaga_capture_rounds_total",
                "Capture worker rounds by resolution: captured, declined, expired, failed, "
                "retry, stalled (retry budget spent, still looked up), lease_lost",
                ["outcome"],
                registry=registry,
            )
        )


_OUTCOMES: dict[type, str] = {
    domain.Captured: "captured",
    domain.CaptureDeclined: "declined",
    domain.Expired: "expired",
    domain.Failed: "failed",
    domain.Retry: "retry",
    domain.Stalled: "stalled",
}


class CaptureWorker(
    LookupIntentWorker[domain.Claim, domain.Resolution, domain.CapturePolicy, CaptureMetrics]
):
    """Capture rounds; also the capture service's janitor (expiry, reclaimed rows)."""

    intents = store.INTENTS
    channel = store.CHANNEL
    topic = CAPTURE_TOPIC
    after_lookup = staticmethod(domain.after_lookup)
    after_call = staticmethod(domain.after_capture)
    retry_later = staticmethod(domain.retry_later)

    @staticmethod
    def event_for(
        claimed: Claimed[domain.Claim], resolution: domain.Resolution
    ) -> BaseModel | None:
        """The event a resolution emits (a retry emits none). ``CaptureFailed`` is emitted
        once per transaction: not again for a row whose alarm was raised already."""
        ctx = claimed.context.model_dump()
        match resolution:
            case domain.Captured(capture_id=capture_id):
                return events.PaymentCaptured(**ctx, capture_id=capture_id)
            case domain.CaptureDeclined(decline_code=code):
                return events.CaptureDeclined(**ctx, decline_code=code)
            case domain.Expired():
                return events.AuthorizationExpired(**ctx)
            case domain.Failed(reason=reason):
                return None if claimed.claim.alerted else events.CaptureFailed(**ctx, reason=reason)
            case domain.Stalled():
                return events.CaptureFailed(**ctx, reason="retry_budget_exhausted")
            case domain.Retry():
                return None

    def report(
        self, claimed: Claimed[domain.Claim], resolution: domain.Resolution, stored: bool
    ) -> None:
        self.metrics.rounds.labels(_OUTCOMES[type(resolution)] if stored else "lease_lost").inc()

    @staticmethod
    def round_name(claim: domain.Claim) -> str:
        return f"capture {claim.transaction_id} round {claim.attempt}"

    def first_step(
        self, claimed: Claimed[domain.Claim]
    ) -> domain.Lookup | domain.Call | domain.Resolution:
        return domain.first_step(claimed.claim, self.clock(), self.policy)

    def not_found(self) -> domain.Resolution:
        return domain.not_found()

    async def call(self, claimed: Claimed[domain.Claim]) -> GatewayOutcome:
        claim = claimed.claim
        return await self.gateway.capture(
            claim.transaction_id, claim.amount, claim.currency, claimed.idempotency_key
        )
