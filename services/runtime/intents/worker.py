"""The rounds of a gateway-intent worker (``services.runtime.intents``)."""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.errors import describe
from services.runtime.faults import fault_point
from services.runtime.gateway_client import (
    GatewayClient,
    GatewayNotFoundError,
    GatewayOutcome,
    GatewayProtocolError,
    GatewayUnavailableError,
)
from services.runtime.intents.store import Claimed, IntentStore
from services.runtime.kept import KeptConnections
from services.runtime.logs import bound
from services.runtime.retry import Call, Lookup, Round
from services.runtime.tracing import span, trace_id_of


class PaymentRound(Round, Protocol):
    """A claim whose round may look its payment up: the gateway's transaction id."""

    @property
    def transaction_id(self) -> str: ...


ClaimT = TypeVar("ClaimT")
PaymentClaimT = TypeVar("PaymentClaimT", bound=PaymentRound)
ResolutionT = TypeVar("ResolutionT")
PolicyT = TypeVar("PolicyT")
MetricsT = TypeVar("MetricsT")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class IntentWorker(abc.ABC, Generic[ClaimT, ResolutionT, PolicyT, MetricsT]):
    """The rounds of a gateway-intent worker (payments' requests; capture and refunds
    through ``LookupIntentWorker``).

    Per round: the intent is claimed (``IntentStore.claim_due``) → ``decide`` calls the
    gateway with the intent's one idempotency key (``call``, no transaction open) and
    reads its answer (``after_call``) → ``IntentStore.resolve`` is transaction B: the
    outcome, fenced by the claim, and its event (``event_for``) in the outbox on
    ``topic``. A round must end well inside its lease, or another worker could reclaim
    the row while this one still calls the gateway: a round over budget becomes a retry
    (which looks the payment up first, or sends the same request again). Rows of a
    worker that died mid-call are reclaimed after their lease, and retried the same way.
    """

    #: the intent table, the channel its recorded intents are announced on and the
    #: topic its events go to (set by each subclass)
    intents: ClassVar[IntentStore[Any, Any]]
    channel: ClassVar[str]
    topic: ClassVar[str]

    def __init__(
        self,
        engine: AsyncEngine,
        gateway: GatewayClient,
        policy: PolicyT,
        metrics: MetricsT,
        *,
        lease: timedelta,
        batch: int = 8,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.engine, self.gateway, self.policy, self.metrics = engine, gateway, policy, metrics
        self.lease, self.batch, self.clock = lease, batch, clock
        self.rng = rng or random.Random()
        #: the connections of the claims and resolutions, kept from one to the next while
        #: the worker's loop runs (``intent_rounds``): a round of each slot in flight
        self.kept = KeptConnections(engine, autocommit=True)
        #: the rounds in flight (``tick``)
        self._rounds: set[asyncio.Task[None]] = set()
        self.round_budget_s = lease.total_seconds() * 0.8
        self.log = logging.getLogger(f"paysaga.{type(self).__name__}")

    @staticmethod
    @abc.abstractmethod
    def event_for(claimed: Claimed[ClaimT], resolution: ResolutionT) -> BaseModel | None:
        """The event a resolution emits (a retry emits none)."""

    @abc.abstractmethod
    async def call(self, claimed: Claimed[ClaimT]) -> GatewayOutcome:
        """The intent's gateway call, under ``claimed.idempotency_key``."""

    @staticmethod
    @abc.abstractmethod
    def after_call(
        claim: ClaimT, outcome: GatewayOutcome, now: datetime, policy: PolicyT, jitter: float
    ) -> ResolutionT:
        """The domain's reading of the call's answer."""

    @abc.abstractmethod
    def retry(self, claimed: Claimed[ClaimT], error: str) -> ResolutionT:
        """The round ends with its outcome unknown: the domain's retry rule."""

    async def decide(self, claimed: Claimed[ClaimT]) -> ResolutionT:
        """The round's gateway call (no transaction open) and what its answer means."""
        try:
            outcome = await self.call(claimed)
        except GatewayProtocolError as exc:
            # an answer outside the contract (e.g. a 409, a 4xx without an error body):
            # the next round finds out what happened (a look-up, or the same key again)
            return self.retry(claimed, f"http_{exc.status_code}")
        return self.after_call(claimed.claim, outcome, self.clock(), self.policy, self.rng.random())

    @abc.abstractmethod
    def report(self, claimed: Claimed[ClaimT], resolution: ResolutionT, stored: bool) -> None:
        """The metrics of a finished round."""

    @staticmethod
    @abc.abstractmethod
    def round_name(claim: ClaimT) -> str:
        """How the log line of a round names it (``capture txn_1 round 2``)."""

    async def claim_due(self, limit: int | None = None) -> list[Claimed[ClaimT]]:
        """Claim up to ``limit`` due intents (``batch`` by default)."""
        n = self.batch if limit is None else limit
        return await self.intents.claim_due(self.kept, self.clock(), n, self.lease)

    async def resolve(self, claimed: Claimed[ClaimT], resolution: ResolutionT) -> bool:
        """Transaction B; False when the claim was lost (another worker took the row)."""
        event = self.event_for(claimed, resolution)
        return await self.intents.resolve(
            self.kept, claimed, resolution, event, self.topic, self.clock()
        )

    async def tick(self) -> bool:
        """Keep up to ``batch`` rounds in flight: start one for each due intent while a
        slot is free; a round that ends frees its slot at once, so one slow gateway call
        holds up no other. With every slot taken, wait for one to free. False when no
        slot was taken up and nothing more is due (the loop waits for a notification).
        A round's error is raised by the tick after it ended (its row stays in_flight
        and is reclaimed after the lease)."""
        self._reap()
        free = self.batch - len(self._rounds)
        claimed = await self.claim_due(free) if free > 0 else []
        for c in claimed:
            self._rounds.add(asyncio.create_task(self._round(c)))
        if len(self._rounds) >= self.batch:
            await asyncio.wait(self._rounds, return_when=asyncio.FIRST_COMPLETED)
            self._reap()
            return True
        return bool(claimed)

    async def drain(self) -> None:
        """Wait for the rounds in flight to end (a graceful stop); raise the first error."""
        if self._rounds:
            await asyncio.wait(self._rounds)
        self._reap()

    def _reap(self) -> None:
        done = [t for t in self._rounds if t.done()]
        self._rounds.difference_update(done)
        errors = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
        for error in errors[1:]:
            self.log.error("round failed", exc_info=error)
        if errors:
            raise errors[0]

    async def _round(self, claimed: Claimed[ClaimT]) -> None:
        # a span per round, in the trace of the record that recorded the intent: its
        # gateway calls and its event are children of it; its log lines name the order
        cause = claimed.cause
        name = f"{type(self).__name__} round"
        with span(name, cause.traceparent, {"paysaga.order_id": claimed.context.order_id}) as tp:
            claimed = dataclasses.replace(claimed, cause=dataclasses.replace(cause, traceparent=tp))
            with bound(
                order_id=claimed.context.order_id,
                event_id=cause.event_id,
                correlation_id=cause.correlation_id,
                trace_id=trace_id_of(tp),
            ):
                try:
                    async with asyncio.timeout(self.round_budget_s):
                        resolution = await self.decide(claimed)  # gateway calls, no transaction
                except TimeoutError:
                    resolution = self.retry(claimed, "round_timeout")
                # the gateway answered (or did not): its outcome is stored next, in B
                fault_point("intent_after_gateway_call")  # the answer known, not stored
                stored = await self.resolve(claimed, resolution)
                self.report(claimed, resolution, stored)
                outcome = resolution if stored else "lease lost"
                self.log.info("%s: %s", self.round_name(claimed.claim), outcome)


class LookupIntentWorker(IntentWorker[PaymentClaimT, ResolutionT, PolicyT, MetricsT]):
    """The rounds of a worker that acts on an existing payment (capture, refunds): a
    round whose last call may have reached the gateway looks the payment up first
    (``first_step``) and acts on the gateway's answer (``after_lookup``) before it
    calls again, under the same key."""

    @abc.abstractmethod
    def first_step(self, claimed: Claimed[PaymentClaimT]) -> Lookup | Call | ResolutionT:
        """Look the payment up, call the gateway, or end the round at once."""

    @staticmethod
    @abc.abstractmethod
    def after_lookup(claim: PaymentClaimT, payment: dict[str, Any]) -> Call | ResolutionT:
        """The domain's reading of the gateway's view of the payment."""

    @abc.abstractmethod
    def not_found(self) -> ResolutionT:
        """How the round ends when the gateway does not know the transaction."""

    @staticmethod
    @abc.abstractmethod
    def retry_later(
        claim: PaymentClaimT, error: str, now: datetime, policy: PolicyT, jitter: float
    ) -> ResolutionT:
        """The domain's retry rule (``services.runtime.retry.retry_later``)."""

    def retry(self, claimed: Claimed[PaymentClaimT], error: str) -> ResolutionT:
        return self.retry_later(claimed.claim, error, self.clock(), self.policy, self.rng.random())

    async def decide(self, claimed: Claimed[PaymentClaimT]) -> ResolutionT:
        step = self.first_step(claimed)
        if isinstance(step, Lookup):
            payment = await self.look_up(claimed)
            if not isinstance(payment, dict):
                return payment
            step = self.after_lookup(claimed.claim, payment)
        if not isinstance(step, Call):
            return step
        return await super().decide(claimed)

    async def look_up(self, claimed: Claimed[PaymentClaimT]) -> dict[str, Any] | ResolutionT:
        """The gateway's view of the payment, or how this round ends without one."""
        try:
            return await self.gateway.get_payment(claimed.claim.transaction_id)
        except GatewayNotFoundError:
            return self.not_found()
        except (GatewayUnavailableError, GatewayProtocolError) as exc:
            return self.retry(claimed, f"lookup: {describe(exc)}")
