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
* ``RetryPolicy`` / ``retry_later``: the pure retry rule of a round whose outcome is
  unknown. An unknown outcome is never final: once the rounds are spent the alarm is
  raised once (``Stalled``) and the intent is still looked up, at a capped interval,
  until the gateway's answer settles it.
* ``IntentStore``: an intent table's rows — recorded (transaction A), claimed with a
  lease and a fencing token, resolved with their event (transaction B). Due times and
  leases are judged by the database's clock (``now()``), never a worker's: one clock
  for every host, so a worker whose clock runs ahead cannot take over a live claim.
* ``IntentWorker``: the rounds (claim → gateway → resolve); ``intent_service`` wires a
  service of them.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import psycopg
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.events import PaymentContext, PaymentRequestContext
from services.runtime.errors import describe, is_transient, said
from services.runtime.faults import fault_point
from services.runtime.gateway_client import (
    GatewayClient,
    GatewayNotFoundError,
    GatewayProtocolError,
    GatewayUnavailableError,
)
from services.runtime.messages import Context, Handler, Route
from services.runtime.outbox import write_event
from services.runtime.service import Service, libpq_conninfo, make_engine
from services.runtime.settings import DatabaseSettings, GatewayClientSettings, KafkaSettings

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
                log.warning("%s worker: %s; retrying in %.1fs", self.name, said(exc), delay)
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
    #: backoff cap of the look-ups that go on after the ``max_attempts`` rounds
    stalled_max_s: float = 900.0

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


@dataclass(frozen=True, slots=True)
class Stalled:
    """The rounds are spent and the outcome is still unknown: raise the alarm (the
    service's failure event, once, at ``alerted_at``: NEEDS_RECONCILIATION) and go on
    looking the payment up at ``next_attempt_at``."""

    alerted_at: datetime
    next_attempt_at: datetime
    error: str


class Round(Protocol):
    """What ``retry_later`` needs of a claim: this round's number (1-based) and
    whether the alarm was raised for it already."""

    @property
    def attempt(self) -> int: ...

    @property
    def alerted(self) -> bool: ...


def retry_later(
    claim: Round, error: str, now: datetime, policy: RetryPolicy, jitter: float
) -> Retry | Stalled:
    """Another round (it starts with a look-up) for an outcome that is not known: the
    money may have moved, so this is never a failure. Within ``max_attempts``: the
    policy's backoff. After them: a backoff capped at ``stalled_max_s``, and the first
    such round raises the alarm (``Stalled``)."""
    if claim.attempt < policy.max_attempts:
        return Retry(now + timedelta(seconds=policy.delay_s(claim.attempt, jitter)), error)
    slow = RetryPolicy(policy.max_attempts, policy.base_s, policy.stalled_max_s)
    at = now + timedelta(seconds=slow.delay_s(claim.attempt, jitter))
    return Retry(at, error) if claim.alerted else Stalled(now, at, error)


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


ClaimT = TypeVar("ClaimT")
ResolutionT = TypeVar("ResolutionT")
PolicyT = TypeVar("PolicyT")
MetricsT = TypeVar("MetricsT")

#: what an intent row remembers for its events: the accepted payment it acts on
#: (capture, refunds), or the attempt whose payment it requests (payments)
IntentContext = PaymentContext | PaymentRequestContext
#: the transaction B hook of an ``IntentStore`` (see ``resolve``)
OnResolved = Callable[[AsyncConnection, "Claimed[Any]", Any, datetime], Awaitable[None]]


def intent_columns() -> list[Column[Any]]:
    """The columns of every intent table, besides its key and its outcome columns."""
    return [
        Column("idempotency_key", Text, nullable=False, unique=True),
        Column("order_id", String(64), nullable=False, index=True),
        Column("amount", BigInteger, nullable=False),
        Column("currency", String(3), nullable=False),
        #: the PaymentContext every resulting event carries
        Column("context", JSONB, nullable=False),
        Column("state", String(16), nullable=False),
        #: worker rounds so far (each claim counts one)
        Column("attempts", Integer, nullable=False, server_default="0"),
        Column("next_attempt_at", DateTime(timezone=True), nullable=True),
        Column("lease_until", DateTime(timezone=True), nullable=True),
        Column("claim_token", String(32), nullable=True),
        Column("cause_event_id", String(64), nullable=False),
        Column("cause_saga_seq", Integer, nullable=True),
        Column("correlation_id", Text, nullable=True),
        Column("last_error", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    ]


def intent_indexes(table: str) -> list[Index]:
    """What the claim query reads: due rows and rows whose lease may have run out."""
    return [
        Index(
            f"ix_{table}_due",
            "next_attempt_at",
            postgresql_where=text("state IN ('pending', 'unknown')"),
        ),
        Index(f"ix_{table}_leased", "lease_until", postgresql_where=text("state = 'in_flight'")),
    ]


def _on_db_clock(values: dict[str, Any], now: datetime) -> dict[str, Any]:
    """``values`` with ``next_attempt_at`` (a time on the caller's clock, whose reading
    is ``now``) moved to the database's clock: ``now()`` plus the same delay. Due times
    are compared with the database's ``now()``, so they must be written on it too — a
    host whose clock runs ahead would otherwise schedule every intent late."""
    at = values.get("next_attempt_at")
    if isinstance(at, datetime):
        return {**values, "next_attempt_at": func.now() + (at - now)}
    return values


@dataclass(frozen=True, slots=True)
class Claimed(Generic[ClaimT]):
    """An intent row claimed for one round; ``token`` fences its transaction B."""

    claim: ClaimT
    idempotency_key: str
    context: IntentContext
    cause: Cause
    token: str


class IntentStore(Generic[ClaimT, ResolutionT]):
    """The life of the rows of one intent table (``intent_columns`` + ``key`` columns +
    outcome columns): ``pending`` (transaction A) → ``in_flight`` (claimed by a worker
    round, with a lease and a fencing token) → ``unknown`` (retry: look up first) … → a
    final state (transaction B, which also writes the resulting event to the outbox).

    Time: ``next_attempt_at`` and ``lease_until`` are written and compared on the
    database's clock (``now()``); the ``now`` callers pass (their own clock) only says
    how far ahead a ``next_attempt_at`` they give lies, and stamps ``created_at`` /
    ``updated_at``.

    ``claim_of`` makes a row's domain claim (it has an attribute per ``key`` column);
    ``values_of`` gives the columns a resolution stores (``state`` among them).
    ``context_model`` is what the ``context`` column holds; ``on_resolved``, if given,
    runs inside transaction B after the resolution is stored (state another table keeps
    in step with the outcome, a second event)."""

    def __init__(
        self,
        table: Table,
        key: tuple[str, ...],
        claim_of: Callable[[Any], ClaimT],
        values_of: Callable[[ResolutionT], dict[str, Any]],
        *,
        context_model: type[PaymentContext] | type[PaymentRequestContext] = PaymentContext,
        on_resolved: OnResolved | None = None,
    ) -> None:
        self.table, self.key, self.claim_of, self.values_of = table, key, claim_of, values_of
        self.context_model, self.on_resolved = context_model, on_resolved

    async def record(
        self,
        conn: AsyncConnection,
        context: IntentContext,
        cause: Cause,
        now: datetime,
        **values: Any,
    ) -> bool:
        """Transaction A (the consumer's): insert the intent; False if the row (or its
        idempotency key) exists already — a redelivered or repeated trigger then causes
        no second gateway call."""
        values = _on_db_clock(values, now)
        inserted = await conn.execute(
            pg_insert(self.table)
            .values(
                **self._key_values(context),
                order_id=context.order_id,
                amount=context.amount,
                currency=context.currency,
                context=context.model_dump(mode="json"),
                cause_event_id=cause.event_id,
                cause_saga_seq=cause.saga_seq,
                correlation_id=cause.correlation_id,
                created_at=now,
                updated_at=now,
                **values,
            )
            .on_conflict_do_nothing()
            .returning(self.table.c[self.key[0]])
        )
        return inserted.first() is not None

    def _key_values(self, context: IntentContext) -> dict[str, Any]:
        """The key columns the context has (``transaction_id``; ``attempt``), besides
        ``order_id``, which every row has."""
        fields = type(context).model_fields
        return {k: getattr(context, k) for k in self.key if k in fields and k != "order_id"}

    async def claim_due(
        self, engine: AsyncEngine, now: datetime, limit: int, lease: timedelta
    ) -> list[Claimed[ClaimT]]:
        """Claim up to ``limit`` rows that are due (pending/unknown whose time has come)
        or whose lease ran out (their worker died mid-call), in one short transaction:
        ``FOR UPDATE SKIP LOCKED`` lets several workers claim side by side, and the claim
        commits before any gateway call, so no transaction stays open across HTTP.
        Both, and the new lease, are judged by the database's ``now()``: a worker whose
        clock is off cannot take a live claim over nor miss an expired one."""
        c = self.table.c
        db_now = func.now()
        due = (
            select(*(c[k] for k in self.key), c.state.label("prior_state"))
            .where(
                or_(
                    and_(c.state.in_(("pending", "unknown")), c.next_attempt_at <= db_now),
                    and_(c.state == "in_flight", c.lease_until <= db_now),
                )
            )
            .order_by(c.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
            .cte("due")
        )
        token = uuid.uuid4().hex
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    update(self.table)
                    .where(*(c[k] == due.c[k] for k in self.key))
                    .values(
                        state="in_flight",
                        attempts=c.attempts + 1,
                        lease_until=db_now + lease,
                        claim_token=token,
                        updated_at=now,
                    )
                    .returning(*c, due.c.prior_state)
                )
            ).all()
        return [
            Claimed(
                claim=self.claim_of(row),
                idempotency_key=row.idempotency_key,
                context=self.context_model.model_validate(row.context),
                cause=Cause(row.cause_event_id, row.cause_saga_seq, row.correlation_id),
                token=token,
            )
            for row in rows
        ]

    async def resolve(
        self,
        engine: AsyncEngine,
        claimed: Claimed[ClaimT],
        resolution: ResolutionT,
        event: BaseModel | None,
        topic: str,
        now: datetime,
    ) -> bool:
        """Transaction B: store the round's resolution and, in the same transaction, write
        its event (if any) to the outbox. Fenced by the claim token: False — nothing
        written — if the lease was lost and another round owns the row now (that round
        looks the payment up, so the outcome is still emitted exactly once)."""
        c = self.table.c
        async with engine.begin() as conn:
            updated = await conn.execute(
                update(self.table)
                .where(
                    *(c[k] == getattr(claimed.claim, k) for k in self.key),
                    c.state == "in_flight",
                    c.claim_token == claimed.token,
                )
                .values(
                    **_on_db_clock(self.values_of(resolution), now),
                    lease_until=None,
                    claim_token=None,
                    updated_at=now,
                )
                .returning(c[self.key[0]])
            )
            if updated.first() is None:
                return False
            if event is not None:
                await emit_caused(
                    conn, claimed.cause, topic, event, key=claimed.context.order_id, now=now
                )
            if self.on_resolved is not None:
                await self.on_resolved(conn, claimed, resolution, now)
        return True


class IntentWorker(abc.ABC, Generic[ClaimT, ResolutionT, PolicyT, MetricsT]):
    """The rounds of a gateway-intent worker (capture, refunds).

    Per round: the intent is claimed (``IntentStore.claim_due``) → ``decide`` looks the
    payment up and/or calls the gateway with the intent's one idempotency key, no
    transaction open → ``IntentStore.resolve`` is transaction B: the outcome, fenced by
    the claim, and its event (``event_for``) in the outbox on ``topic``. A round must
    end well inside its lease, or another worker could reclaim the row while this one
    still calls the gateway: a round over budget becomes a retry (which looks the
    payment up first). Rows of a worker that died mid-call are reclaimed after their
    lease, and looked up first.
    """

    #: the intent table and the topic its events go to (set by each subclass)
    intents: ClassVar[IntentStore[Any, Any]]
    topic: ClassVar[str]
    #: reason of the failure when the gateway does not know the transaction
    not_found_reason = "not_found"

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
        self.round_budget_s = lease.total_seconds() * 0.8
        self.log = logging.getLogger(f"paysaga.{type(self).__name__}")

    @staticmethod
    @abc.abstractmethod
    def event_for(claimed: Claimed[ClaimT], resolution: ResolutionT) -> BaseModel | None:
        """The event a resolution emits (a retry emits none)."""

    @abc.abstractmethod
    async def decide(self, claimed: Claimed[ClaimT]) -> ResolutionT: ...

    @abc.abstractmethod
    def retry(self, claimed: Claimed[ClaimT], error: str) -> ResolutionT: ...

    @abc.abstractmethod
    def record(self, claimed: Claimed[ClaimT], resolution: ResolutionT, stored: bool) -> None:
        """Metrics and a log line for a finished round."""

    async def claim_due(self) -> list[Claimed[ClaimT]]:
        return await self.intents.claim_due(self.engine, self.clock(), self.batch, self.lease)

    async def resolve(self, claimed: Claimed[ClaimT], resolution: ResolutionT) -> bool:
        """Transaction B; False when the claim was lost (another worker took the row)."""
        event = self.event_for(claimed, resolution)
        return await self.intents.resolve(
            self.engine, claimed, resolution, event, self.topic, self.clock()
        )

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

    async def _round(self, claimed: Claimed[ClaimT]) -> None:
        try:
            async with asyncio.timeout(self.round_budget_s):
                resolution = await self.decide(claimed)
        except TimeoutError:
            resolution = self.retry(claimed, "round_timeout")
        fault_point("intent_after_gateway_call")  # the answer is known, not yet stored
        self.record(claimed, resolution, await self.resolve(claimed, resolution))

    async def look_up(
        self, claimed: Claimed[ClaimT], transaction_id: str
    ) -> dict[str, Any] | Failed | ResolutionT:
        """The gateway's view of the payment, or how this round ends without one."""
        try:
            return await self.gateway.get_payment(transaction_id)
        except GatewayNotFoundError:
            return Failed(self.not_found_reason)
        except (GatewayUnavailableError, GatewayProtocolError) as exc:
            return self.retry(claimed, f"lookup: {describe(exc)}")


class IntentServiceSettings(BaseSettings):
    """A gateway-intent service's own settings, ``PAYSAGA_<SERVICE>_…`` (a subclass sets
    the prefix and the port)."""

    port: int
    host: str = "127.0.0.1"
    #: worker rounds before the alarm (→ NEEDS_RECONCILIATION); a final answer of the
    #: gateway ends them sooner, an unknown outcome is looked up after them
    max_attempts: int = 10
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    #: after the rounds: look-ups at most this far apart until the gateway settles it
    stalled_retry_max_s: float = 900.0
    #: must exceed one round's worst case (look-up + call, each up to the gateway
    #: client's PAYSAGA_GATEWAY_MAX_ATTEMPTS x PAYSAGA_GATEWAY_TIMEOUT_S plus backoff)
    lease_s: float = 120.0
    poll_s: float = 0.5
    concurrency: int = 8

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            self.max_attempts, self.retry_base_s, self.retry_max_s, self.stalled_retry_max_s
        )


class SharedSettings(KafkaSettings, DatabaseSettings, GatewayClientSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")


def intent_service(
    name: str,
    own: IntentServiceSettings,
    shared: SharedSettings,
    *,
    handlers: Mapping[str, Mapping[str, Handler]],
    channel: str,
    worker: type[IntentWorker[Any, Any, PolicyT, MetricsT]],
    policy: PolicyT,
    metrics: MetricsT,
    registry: CollectorRegistry,
) -> Service:
    """Wire a gateway-intent service: its consumer (``handlers`` record intents in
    transaction A and NOTIFY ``channel``) and one ``WorkLoop`` running ``worker`` rounds."""
    url = shared.url_for(name)
    engine = make_engine(url, pool_size=own.concurrency + 2)

    async def work(stop: asyncio.Event) -> None:
        async with GatewayClient(
            shared.gateway_url,
            timeout_s=shared.gateway_timeout_s,
            max_attempts=shared.gateway_max_attempts,
        ) as gateway:
            rounds = worker(
                engine, gateway, policy, metrics,
                lease=timedelta(seconds=own.lease_s), batch=own.concurrency,
            )  # fmt: skip
            await WorkLoop(name, libpq_conninfo(url), channel, rounds.tick, own.poll_s).run(stop)

    return Service(
        name=name,
        group=f"paysaga.{name}",
        engine=engine,
        database_url=url,
        bootstrap=shared.kafka_bootstrap_servers,
        routes=[Route(topic, handlers=dict(h)) for topic, h in handlers.items()],
        registry=registry,
        http_port=own.port,
        http_host=own.host,
        workers=[work],
    )
