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
from services.runtime.gateway_client import GatewayProtocolError
from services.runtime.intents.store import Claimed
from services.runtime.intents.worker import IntentWorker
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
    IntentWorker[domain.Claim, domain.Resolution, domain.CapturePolicy, CaptureMetrics]
):
    """Capture rounds; also the capture service's janitor (expiry, reclaimed rows)."""

    not_found_reason = "transaction_not_found"

    intents = store.INTENTS
    topic = CAPTURE_TOPIC

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
        claim = claimed.claim
        self.metrics.rounds.labels(_OUTCOMES[type(resolution)] if stored else "lease_lost").inc()
        self.log.info(
            "capture %s round %d: %s",
            claim.transaction_id,
            claim.attempt,
            resolution if stored else "lease lost",
        )

    async def decide(self, claimed: Claimed[domain.Claim]) -> domain.Resolution:
        claim = claimed.claim
        first = domain.first_step(claim, self.clock(), self.policy)
        if isinstance(first, domain.Lookup):
            payment = await self.look_up(claimed, claim.transaction_id)
            if isinstance(payment, domain.Failed):  # 404: the gateway does not know it
                return domain.not_found()
            if not isinstance(payment, dict):
                return payment
            step = domain.after_lookup(claim, payment)
        else:
            step = first
        if not isinstance(step, domain.CallCapture):
            return step
        try:
            outcome = await self.gateway.capture(
                claim.transaction_id, claim.amount, claim.currency, claimed.idempotency_key
            )
        except GatewayProtocolError as exc:
            # outside the contract (e.g. 409): the look-up next round tells what happened
            return self.retry(claimed, f"http_{exc.status_code}")
        return domain.after_capture(claim, outcome, self.clock(), self.policy, self.rng.random())

    def retry(self, claimed: Claimed[domain.Claim], error: str) -> domain.Retry | domain.Stalled:
        return domain.retry_later(
            claimed.claim, error, self.clock(), self.policy, self.rng.random()
        )
