"""The payment request worker (docs/contract.md §3.7): takes the payment requests the OrderPlaced
and retry handlers recorded to the gateway, and records the outcomes.

Per round (see ``requests``): claim (short transaction, ``FOR UPDATE SKIP LOCKED``,
state ``in_flight`` with a lease) → ``POST /v1/payment_intents`` with the attempt's one
idempotency key (no transaction open; a replay after an unknown outcome returns the
first result) → transaction B (fenced): the outcome, its saga event, the order's
payment intent and — for a created payment — PaymentRequested with the client secret
(``request_store._request_resolved``). Rows whose worker died mid-call are reclaimed
after the lease and sent again under the same key.

The client secret lives in this process's memory during the round, then in the outbox
row until the relay has published it; the relay deletes such rows once Kafka has them
(``relay.FORGOTTEN_ONCE_SENT``). It is never logged
(``requests.Requested.__repr__``).
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from schemas import events
from services.payments import request_store, requests
from services.runtime.faults import fault_point
from services.runtime.gateway_client import GatewayOutcome
from services.runtime.intents.store import Claimed
from services.runtime.intents.worker import IntentWorker
from services.runtime.retry import RetryPolicy
from services.runtime.topics import PAYMENTS_TOPIC


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    rounds: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RequestMetrics:
        return cls(
            rounds=Counter(
                "paysaga_payment_request_rounds_total",
                "Payment request rounds by resolution: requested, refused, failed, retry, "
                "lease_lost",
                ["outcome"],
                registry=registry,
            )
        )


class RequestWorker(IntentWorker[requests.Claim, requests.Resolution, RetryPolicy, RequestMetrics]):
    """Payment request rounds."""

    intents = request_store.REQUESTS
    channel = request_store.REQUEST_CHANNEL
    topic = PAYMENTS_TOPIC
    after_call = staticmethod(requests.after_call)

    @staticmethod
    def event_for(
        claimed: Claimed[requests.Claim], resolution: requests.Resolution
    ) -> BaseModel | None:
        """The saga event of a resolution (a retry emits none); PaymentRequested itself
        is written by the store's transaction B hook."""
        claim = claimed.claim
        match resolution:
            case requests.Requested(payment_intent_id=intent):
                return events.PaymentIntentCreated(
                    order_id=claim.order_id, attempt=claim.attempt, payment_intent_id=intent
                )
            case requests.Refused(code=code, message=message):
                return events.PaymentRequestRefused(
                    order_id=claim.order_id,
                    attempt=claim.attempt,
                    failure_code=code,
                    failure_message=message,
                )
            case requests.Failed(reason=reason):
                return events.PaymentRequestFailed(
                    order_id=claim.order_id, attempt=claim.attempt, reason=reason
                )
            case requests.Retry():
                return None

    def report(
        self, claimed: Claimed[requests.Claim], resolution: requests.Resolution, stored: bool
    ) -> None:
        outcome = type(resolution).__name__.lower() if stored else "lease_lost"
        self.metrics.rounds.labels(outcome).inc()

    @staticmethod
    def round_name(claim: requests.Claim) -> str:
        return f"payment request {claim.order_id} attempt {claim.attempt} round {claim.round}"

    async def call(self, claimed: Claimed[requests.Claim]) -> GatewayOutcome:
        claim = claimed.claim
        outcome = await self.gateway.create_payment_intent(
            claim.order_id,
            claim.amount,
            claim.currency,
            claim.payment_method,
            claimed.idempotency_key,
        )
        fault_point("payment_request_after_gateway_call")
        return outcome

    def retry(
        self, claimed: Claimed[requests.Claim], error: str
    ) -> requests.Retry | requests.Failed:
        return requests.retry_or_fail(
            claimed.claim.round, error, self.clock(), self.policy, self.rng.random()
        )
