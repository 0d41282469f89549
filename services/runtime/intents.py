"""Machinery for gateway intents, shared by capture and refunds (DESIGN.md "Calls to
the gateway"): transaction A records an intent with a deterministic idempotency key; a
worker claims it, calls the gateway, and transaction B records the outcome and emits
its event. This module holds what both services need for that:

* ``WorkLoop``: runs a worker's ``tick`` while it finds work, then sleeps until the
  intent table's NOTIFY channel fires or ``poll_s`` passes. Handlers NOTIFY inside the
  transaction that records the intent, so it is delivered at commit — a worker never
  wakes before the row is visible. The poll picks up what no notification announces:
  retries whose ``next_attempt_at`` has come, expired leases, notifications lost while
  the listening connection was down.
* ``Cause`` / ``emit_caused``: transaction B's event, with the envelope ``Context.emit``
  writes (causation = the stored cause's event id, ``saga_seq`` = the cause's + 1,
  correlation propagated).
* ``RetryPolicy`` / ``retry_or_fail``: the pure retry arithmetic of a round.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

import psycopg
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime.errors import is_transient
from services.runtime.gateway_client import (
    GatewayClient,
    GatewayNotFoundError,
    GatewayProtocolError,
    GatewayUnavailableError,
)
from services.runtime.messages import Context
from services.runtime.outbox import write_event

log = logging.getLogger("paysaga.work_loop")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


async def notify(conn: AsyncConnection, channel: str) -> None:
    """Wake the workers listening on ``channel`` once ``conn``'s transaction commits."""
    await conn.execute(text(f"NOTIFY {channel}"))


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
    ) -> None:
        self.name, self.conninfo, self.channel = name, conninfo, channel
        self.tick, self.poll_s, self.backoff_max_s = tick, poll_s, backoff_max_s
        self._rng = random.Random()

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True
                ) as listener:
                    await listener.execute(f"LISTEN {self.channel}")
                    while not stop.is_set():
                        while not stop.is_set() and await self.tick():
                            pass
                        failures = 0
                        await self._wait(listener)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                failures += 1
                delay = min(self.backoff_max_s, 0.5 * 2 ** min(failures, 10))
                log.warning("%s worker: %r; retrying in %.1fs", self.name, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay * self._rng.uniform(0.5, 1))

    async def _wait(self, listener: psycopg.AsyncConnection[object]) -> None:
        with contextlib.suppress(TimeoutError):
            async for _ in listener.notifies(timeout=self.poll_s, stop_after=1):
                break
        # one tick serves every notification that piled up meanwhile
        with contextlib.suppress(TimeoutError):
            async for _ in listener.notifies(timeout=0.001):
                pass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    max_s: float

    def delay_s(self, attempt: int, jitter: float) -> float:
        """Before round ``attempt + 1``: exponential, capped, with "equal jitter" (half
        fixed, half ``jitter`` in [0, 1)) so that retries spread but never bunch at 0."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** max(0, attempt - 1))
        return ceiling / 2 + jitter * ceiling / 2


@dataclass(frozen=True, slots=True)
class Failed:
    """Automatic handling is over; ``reason`` is a snake_case code."""

    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Another round at ``next_attempt_at``, starting with a look-up."""

    next_attempt_at: datetime
    error: str


def retry_or_fail(
    attempt: int, error: str, now: datetime, policy: RetryPolicy, jitter: float
) -> Retry | Failed:
    """Another round, or — after ``max_attempts`` rounds — failure to reconciliation."""
    if attempt >= policy.max_attempts:
        return Failed("retry_budget_exhausted")
    return Retry(now + timedelta(seconds=policy.delay_s(attempt, jitter)), error)


@dataclass(frozen=True, slots=True)
class Cause:
    """What an intent row remembers of the event that created it."""

    event_id: str
    saga_seq: int | None
    correlation_id: str | None

    @classmethod
    def of(cls, ctx: Context) -> Cause:
        envelope: dict[str, Any] = ctx.envelope or {}
        seq = envelope.get("saga_seq")
        correlation = envelope.get("correlation_id")
        return cls(
            event_id=str(envelope["event_id"]),
            saga_seq=int(seq) if seq else None,
            correlation_id=str(correlation) if correlation is not None else None,
        )

    @property
    def next_seq(self) -> int:
        return self.saga_seq + 1 if self.saga_seq else 1


async def emit_caused(
    conn: AsyncConnection,
    cause: Cause,
    topic: str,
    payload: BaseModel,
    *,
    key: str,
    now: datetime,
) -> str:
    """Write ``payload`` (event type = its model's name) to the outbox in ``conn``'s
    transaction, as an effect of ``cause``. Returns the new event id."""
    return await write_event(
        conn,
        topic,
        type(payload).__name__,
        payload,
        key=key,
        now=now,
        causation_id=cause.event_id,
        saga_seq=cause.next_seq,
        correlation_id=cause.correlation_id,
    )


ClaimedT = TypeVar("ClaimedT")
ResolutionT = TypeVar("ResolutionT")


class IntentWorker(abc.ABC, Generic[ClaimedT, ResolutionT]):
    """The rounds of a gateway-intent worker (capture, refunds).

    Per round: the intent is claimed (``claim_due``: a short transaction, ``FOR UPDATE
    SKIP LOCKED``, state ``in_flight`` with a lease) → ``decide`` looks the payment up
    and/or calls the gateway with the intent's one idempotency key, no transaction open
    → ``resolve`` is transaction B: the outcome, fenced by the claim, and its event in
    the outbox. A round must end well inside its lease, or another worker could reclaim
    the row while this one still calls the gateway: a round over budget becomes a retry
    (which looks the payment up first). Rows of a worker that died mid-call are
    reclaimed after their lease, and looked up first.
    """

    #: reason of the failure when the gateway does not know the transaction
    not_found_reason = "not_found"

    def __init__(
        self,
        engine: AsyncEngine,
        gateway: GatewayClient,
        *,
        lease: timedelta,
        batch: int = 8,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.engine, self.gateway = engine, gateway
        self.lease, self.batch, self.clock = lease, batch, clock
        self.rng = rng or random.Random()
        self.round_budget_s = lease.total_seconds() * 0.8
        self.log = logging.getLogger(f"paysaga.{type(self).__name__}")

    @abc.abstractmethod
    async def claim_due(self) -> Sequence[ClaimedT]: ...

    @abc.abstractmethod
    async def decide(self, claimed: ClaimedT) -> ResolutionT: ...

    @abc.abstractmethod
    async def resolve(self, claimed: ClaimedT, resolution: ResolutionT) -> bool:
        """Transaction B; False when the claim was lost (another worker took the row)."""

    @abc.abstractmethod
    def retry(self, claimed: ClaimedT, error: str) -> ResolutionT: ...

    @abc.abstractmethod
    def record(self, claimed: ClaimedT, resolution: ResolutionT, stored: bool) -> None:
        """Metrics and a log line for a finished round."""

    async def tick(self) -> bool:
        """Run one round for each due intent (concurrently); False if none was due."""
        claimed = await self.claim_due()
        if not claimed:
            return False
        results = await asyncio.gather(*(self._round(c) for c in claimed), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors[1:]:
            self.log.error("round failed", exc_info=error)
        if errors:
            raise errors[0]  # its row stays in_flight and is reclaimed after the lease
        return True

    async def _round(self, claimed: ClaimedT) -> None:
        try:
            async with asyncio.timeout(self.round_budget_s):
                resolution = await self.decide(claimed)
        except TimeoutError:
            resolution = self.retry(claimed, "round_timeout")
        self.record(claimed, resolution, await self.resolve(claimed, resolution))

    async def look_up(
        self, claimed: ClaimedT, transaction_id: str
    ) -> dict[str, Any] | Failed | ResolutionT:
        """The gateway's view of the payment, or how this round ends without one."""
        try:
            return await self.gateway.get_payment(transaction_id)
        except GatewayNotFoundError:
            return Failed(self.not_found_reason)
        except (GatewayUnavailableError, GatewayProtocolError) as exc:
            return self.retry(claimed, f"lookup: {exc}")
