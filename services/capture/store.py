"""The ``captures`` table: one row per transaction (its primary key), so a transaction
has at most one capture intent, under the one idempotency key ``capture:{txn}``.

Life of a row: ``pending`` (transaction A, in the StockReserved handler) →
``in_flight`` (claimed by a worker round, with a lease and a fencing token) →
``unknown`` (retry: look up first) … → a final state (transaction B, which also writes
the resulting event to the outbox). A sale is recorded as ``sale_confirmed``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import BaseModel
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.events import PaymentContext
from services.capture import domain
from services.runtime.intents import Cause, emit_caused

metadata = MetaData()

#: the NOTIFY channel capture workers listen on
CHANNEL = "paysaga_capture_intents"

captures = Table(
    "captures",
    metadata,
    Column("transaction_id", Text, primary_key=True),
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
    Column("authorized_at", DateTime(timezone=True), nullable=False),
    Column("cause_event_id", String(64), nullable=False),
    Column("cause_saga_seq", Integer, nullable=True),
    Column("correlation_id", Text, nullable=True),
    Column("capture_id", Text, nullable=True),
    #: decline code or failure reason of a final row
    Column("outcome_reason", String(64), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint(
        "state IN ('pending', 'in_flight', 'unknown', 'captured', 'declined', 'expired', "
        "'failed', 'sale_confirmed')",
        name="ck_captures_state",
    ),
    Index(
        "ix_captures_due",
        "next_attempt_at",
        postgresql_where=text("state IN ('pending', 'unknown')"),
    ),
    Index("ix_captures_leased", "lease_until", postgresql_where=text("state = 'in_flight'")),
)


async def record_intent(
    conn: AsyncConnection,
    context: PaymentContext,
    intent: domain.NewCapture,
    cause: Cause,
    now: datetime,
) -> bool:
    """Transaction A (the consumer's): insert the transaction's row; False if it has one
    already — a redelivered or re-emitted StockReserved then does nothing."""
    inserted = await conn.execute(
        pg_insert(captures)
        .values(
            transaction_id=context.transaction_id,
            idempotency_key=intent.idempotency_key,
            order_id=context.order_id,
            amount=context.amount,
            currency=context.currency,
            context=context.model_dump(mode="json"),
            state=intent.state,
            next_attempt_at=intent.next_attempt_at,
            authorized_at=intent.authorized_at,
            cause_event_id=cause.event_id,
            cause_saga_seq=cause.saga_seq,
            correlation_id=cause.correlation_id,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
        .returning(captures.c.transaction_id)
    )
    return inserted.first() is not None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row claimed for one round; ``token`` fences its transaction B."""

    claim: domain.Claim
    idempotency_key: str
    context: PaymentContext
    cause: Cause
    token: str


async def claim_due(
    engine: AsyncEngine, now: datetime, limit: int, lease: timedelta
) -> list[Claimed]:
    """Claim up to ``limit`` rows that are due (pending/unknown whose time has come) or
    whose lease ran out (their worker died mid-call), in one short transaction:
    ``FOR UPDATE SKIP LOCKED`` lets several workers claim side by side, and the claim
    commits before any gateway call, so no transaction stays open across HTTP."""
    due = (
        select(captures.c.transaction_id, captures.c.state.label("prior_state"))
        .where(
            or_(
                and_(
                    captures.c.state.in_(("pending", "unknown")), captures.c.next_attempt_at <= now
                ),
                and_(captures.c.state == "in_flight", captures.c.lease_until <= now),
            )
        )
        .order_by(captures.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    token = uuid.uuid4().hex
    async with engine.begin() as conn:
        rows = (
            await conn.execute(
                update(captures)
                .where(captures.c.transaction_id == due.c.transaction_id)
                .values(
                    state="in_flight",
                    attempts=captures.c.attempts + 1,
                    lease_until=now + lease,
                    claim_token=token,
                    updated_at=now,
                )
                .returning(*captures.c, due.c.prior_state)
            )
        ).all()
    return [_claimed(row, token) for row in rows]


def _claimed(row: Any, token: str) -> Claimed:
    return Claimed(
        claim=domain.Claim(
            transaction_id=row.transaction_id,
            amount=row.amount,
            currency=row.currency,
            prior_state=cast(domain.CaptureState, row.prior_state),
            attempt=row.attempts,
            authorized_at=row.authorized_at,
        ),
        idempotency_key=row.idempotency_key,
        context=PaymentContext.model_validate(row.context),
        cause=Cause(row.cause_event_id, row.cause_saga_seq, row.correlation_id),
        token=token,
    )


def _values(resolution: domain.Resolution) -> dict[str, Any]:
    match resolution:
        case domain.Captured(capture_id=capture_id):
            return {"state": "captured", "capture_id": capture_id}
        case domain.CaptureDeclined(decline_code=code):
            return {"state": "declined", "outcome_reason": code[:64]}
        case domain.Expired():
            return {"state": "expired"}
        case domain.Failed(reason=reason):
            return {"state": "failed", "outcome_reason": reason}
        case domain.Retry(next_attempt_at=at, error=error):
            return {"state": "unknown", "next_attempt_at": at, "last_error": error[:500]}


async def resolve(
    engine: AsyncEngine,
    claimed: Claimed,
    resolution: domain.Resolution,
    event: BaseModel | None,
    topic: str,
    now: datetime,
) -> bool:
    """Transaction B: store the round's resolution and, in the same transaction, write
    its event (if any) to the outbox. Fenced by the claim token: False — nothing
    written — if the lease was lost and another round owns the row now (that round
    looks the payment up, so the outcome is still emitted exactly once)."""
    async with engine.begin() as conn:
        updated = await conn.execute(
            update(captures)
            .where(
                captures.c.transaction_id == claimed.claim.transaction_id,
                captures.c.state == "in_flight",
                captures.c.claim_token == claimed.token,
            )
            .values(**_values(resolution), lease_until=None, claim_token=None, updated_at=now)
            .returning(captures.c.transaction_id)
        )
        if updated.first() is None:
            return False
        if event is not None:
            await emit_caused(
                conn, claimed.cause, topic, event, key=claimed.context.order_id, now=now
            )
    return True
