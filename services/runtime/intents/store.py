"""The rows of a gateway-intent table and their life (``services.runtime.intents``)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    Interval,
    Select,
    String,
    Table,
    Text,
    Update,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.events import PaymentContext, PaymentRequestContext
from services.runtime import driver
from services.runtime.bound import bound, prefixed
from services.runtime.kept import KeptConnections
from services.runtime.outbox import OUTBOX_CHANNEL, ROW_COLUMNS, Cause, event_row, write_event
from services.runtime.retry import Retry, Stalled
from services.runtime.tables import outbox
from services.runtime.tracing import current as current_traceparent

ClaimT = TypeVar("ClaimT")
ResolutionT = TypeVar("ResolutionT")

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
        #: the span that recorded the intent: its rounds and event continue its trace
        Column("traceparent", String(55), nullable=True),
        Column("last_error", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    ]


#: the states the claim query reads, as the predicates of its partial indexes. Written
#: as constants in the query too, never as parameters: a prepared statement's generic
#: plan cannot match a parameter to an index predicate, and would scan the whole table
#: (which only grows) on every claim.
_DUE = "state IN ('pending', 'unknown')"
_LEASED = "state = 'in_flight'"


def intent_indexes(table: str) -> list[Index]:
    """What the claim query reads: due rows and rows whose lease may have run out."""
    return [
        Index(f"ix_{table}_due", "next_attempt_at", postgresql_where=text(_DUE)),
        Index(f"ix_{table}_leased", "lease_until", postgresql_where=text(_LEASED)),
    ]


#: the shape of the values a statement built once sets: each column's name, and whether
#: it is a time on the caller's clock to move to the database's (``_on_db_clock``)
Shape = tuple[tuple[str, bool], ...]


def _on_db_clock(values: dict[str, Any], now: datetime) -> tuple[Shape, dict[str, Any]]:
    """``values`` as a statement built once (``_set``) binds them: their shape and
    their parameters (``:v_<column>``), with ``next_attempt_at`` (a time on the caller's
    clock, whose reading is ``now``) moved to the database's clock — ``now()`` plus the
    same delay, the delay bound. Due times are compared with the database's ``now()``,
    so they must be written on it too: a host whose clock runs ahead would otherwise
    schedule every intent late."""
    shape = tuple(
        (k, k == "next_attempt_at" and isinstance(v, datetime)) for k, v in values.items()
    )
    moved = {k: values[k] - now if clocked else values[k] for k, clocked in shape}
    return shape, prefixed(moved, "v_")


def _set(table: Table, shape: Shape) -> dict[Any, Any]:
    """The columns of ``shape``, each from its bound parameter (``_on_db_clock``)."""
    values = bound(table, (k for k, clocked in shape if not clocked), "v_")
    for k, clocked in shape:
        if clocked:
            values[table.c[k]] = func.now() + bindparam(f"v_{k}", type_=Interval)
    return values


@dataclass(frozen=True, slots=True)
class Claimed(Generic[ClaimT]):
    """An intent row claimed for one round; ``token`` fences its transaction B."""

    claim: ClaimT
    idempotency_key: str
    context: IntentContext
    cause: Cause
    token: str


def unsettled_values(resolution: Retry | Stalled) -> dict[str, Any]:
    """The columns of a resolution that leaves the outcome unknown: another round at
    ``next_attempt_at`` (a look-up first), with the alarm's time once it was raised."""
    values: dict[str, Any] = {
        "state": "unknown",
        "next_attempt_at": resolution.next_attempt_at,
        "last_error": resolution.error[:500],
    }
    if isinstance(resolution, Stalled):
        values["alerted_at"] = resolution.alerted_at
    return values


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
        #: the statements built once (``_built``), by what they do and the values' shape
        self._statements: dict[tuple[Any, ...], Any] = {}
        self._claim = driver.sql_of(self._build_claim())

    def _built(self, what: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """The statement ``what`` names, built the first time it is asked for: each
        execution only binds its values (no statement construction per call)."""
        stmt = self._statements.get(what)
        if stmt is None:
            stmt = self._statements[what] = build()
        return stmt

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
        shape, params = _on_db_clock(
            {
                **self._key_values(context),
                "order_id": context.order_id,
                "amount": context.amount,
                "currency": context.currency,
                "context": context.model_dump(mode="json"),
                "cause_event_id": cause.event_id,
                "cause_saga_seq": cause.saga_seq,
                "correlation_id": cause.correlation_id,
                "traceparent": cause.traceparent or current_traceparent(),
                "created_at": now,
                "updated_at": now,
                **values,
            },
            now,
        )
        inserted = self._built(
            ("record", shape),
            lambda: driver.sql_of(
                pg_insert(self.table)
                .values(_set(self.table, shape))
                .on_conflict_do_nothing()
                .returning(self.table.c[self.key[0]])
            ),
        )
        return bool(await driver.rows(conn, inserted, params))

    def _key_values(self, context: IntentContext) -> dict[str, Any]:
        """The key columns the context has (``transaction_id``; ``attempt``), besides
        ``order_id``, which every row has."""
        fields = type(context).model_fields
        return {k: getattr(context, k) for k in self.key if k in fields and k != "order_id"}

    def _build_claim(self) -> Update:
        """``claim_due``'s statement: up to ``:limit`` rows, leased for ``:lease`` under
        ``:token`` (``:now`` the caller's clock, for ``updated_at``); sent on the driver's
        connection (``driver``), its constants written in."""
        c = self.table.c
        db_now = func.now()
        limit = bindparam("limit", type_=Integer)

        def half(predicate: str, until: Any) -> Any:
            # each half an index scan of its partial index in its order: an OR of the
            # two made a bitmap scan, which visits every row its index still lists —
            # rows long settled, until vacuum — and, unlike an index scan, never marks
            # their entries dead for the next claim (680 pages read for none due)
            return (
                select(
                    *(c[k] for k in self.key),
                    c.state.label("prior_state"),
                    c.next_attempt_at.label("sort_at"),
                )
                .where(text(predicate), until <= db_now)
                .order_by(until)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )

        both = union_all(
            half(_DUE, c.next_attempt_at).subquery().select(),
            half(_LEASED, c.lease_until).subquery().select(),
        ).subquery("candidates")
        # the earliest next_attempt_at first, as the one scan of both chose them; a
        # candidate locked and not taken here is released when the statement commits
        due = (
            select(*(both.c[k] for k in self.key), both.c.prior_state)
            .order_by(both.c.sort_at)
            .limit(limit)
            .cte("due")
        )
        return (
            update(self.table)
            .where(*(c[k] == due.c[k] for k in self.key))
            .values(
                state=literal_column("'in_flight'"),
                attempts=c.attempts + literal_column("1"),
                lease_until=db_now + bindparam("lease", type_=Interval),
                claim_token=bindparam("token", type_=String),
                updated_at=bindparam("now", type_=DateTime(timezone=True)),
            )
            .returning(*c, due.c.prior_state)
        )

    async def claim_due(
        self, kept: KeptConnections, now: datetime, limit: int, lease: timedelta
    ) -> list[Claimed[ClaimT]]:
        """Claim up to ``limit`` rows that are due (pending/unknown whose time has come)
        or whose lease ran out (their worker died mid-call), in one short transaction:
        ``FOR UPDATE SKIP LOCKED`` lets several workers claim side by side, and the claim
        commits before any gateway call, so no transaction stays open across HTTP.
        Both, and the new lease, are judged by the database's ``now()``: a worker whose
        clock is off cannot take a live claim over nor miss an expired one."""
        token = uuid.uuid4().hex
        params = {"limit": limit, "lease": lease, "token": token, "now": now}
        async with kept.autocommit() as conn:  # one statement: a transaction of its own
            rows = await driver.rows(conn, self._claim, params)
        return [
            Claimed(
                claim=self.claim_of(row),
                idempotency_key=row.idempotency_key,
                context=self.context_model.model_validate(row.context),
                cause=Cause(
                    row.cause_event_id, row.cause_saga_seq, row.correlation_id, row.traceparent
                ),
                token=token,
            )
            for row in rows
        ]

    async def resolve(
        self,
        kept: KeptConnections,
        claimed: Claimed[ClaimT],
        resolution: ResolutionT,
        event: BaseModel | None,
        topic: str,
        now: datetime,
    ) -> bool:
        """Transaction B: store the round's resolution and, in the same transaction, write
        its event (if any) to the outbox — one statement in autocommit where no
        ``on_resolved`` runs (``_with_event``). Fenced by the claim token: False — nothing
        written — if the lease was lost and another round owns the row now (that round
        looks the payment up, so the outcome is still emitted exactly once)."""
        shape, params = _on_db_clock(
            {
                **self.values_of(resolution),
                "lease_until": None,
                "claim_token": None,
                "updated_at": now,
            },
            now,
        )
        params.update({f"k_{k}": getattr(claimed.claim, k) for k in self.key})
        params["k_token"] = claimed.token
        if self.on_resolved is None:
            # one statement, its own transaction: the outcome and, only if the claim
            # held, its event (with the relay's wake-up)
            if event is not None:
                key, cause = claimed.context.order_id, claimed.cause
                _, row = event_row(topic, event, key=key, now=now, cause=cause)
                params.update({f"e_{k}": v for k, v in row.items()})
            stmt = self._built(
                ("resolve", shape, event is not None),
                lambda: driver.sql_of(
                    _with_event(self._stored(shape), with_event=event is not None)
                ),
            )
            async with kept.autocommit() as conn:
                return bool(await driver.rows(conn, stmt, params))
        stored = self._built(("resolve", shape, False), lambda: driver.sql_of(self._stored(shape)))
        async with kept.engine.begin() as conn:
            if not await driver.rows(conn, stored, params):
                return False
            if event is not None:
                await write_event(
                    conn, topic, event, key=claimed.context.order_id, now=now, cause=claimed.cause
                )
            await self.on_resolved(conn, claimed, resolution, now)
        return True

    def _stored(self, shape: Shape) -> Update:
        """Transaction B's update: the resolution's values (``shape``), fenced by the
        claim (the key ``:k_<column>``, ``:k_token``); it returns the row it updated."""
        c = self.table.c
        return (
            update(self.table)
            .where(
                *(c[k] == bindparam(f"k_{k}", type_=c[k].type) for k in self.key),
                c.state == literal_column("'in_flight'"),
                c.claim_token == bindparam("k_token", type_=String),
            )
            .values(_set(self.table, shape))
            .returning(c[self.key[0]])
        )


def _with_event(stored: Update, *, with_event: bool) -> Update | Select[Any]:
    """``stored`` (an update returning the row it fenced) with, if ``with_event``, the
    insert of an event's outbox row (``:e_<column>``) and the relay's wake-up — both
    only if the update stored."""
    if not with_event:
        return stored
    resolved = stored.cte("resolved")
    values = select(*(bindparam(f"e_{k}", type_=outbox.c[k].type).label(k) for k in ROW_COLUMNS))
    written = insert(outbox).from_select(ROW_COLUMNS, values.where(exists(select(resolved))))
    woken = func.pg_notify(literal_column(f"'{OUTBOX_CHANNEL}'"), literal_column("''"))
    return select(*resolved.c, woken).add_cte(written.cte("written"))
