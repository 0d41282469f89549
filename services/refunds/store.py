"""The ``compensations`` table: one row per (transaction_id, action) — its primary key
is what makes "never two refunds (or voids) of one transaction" a database rule — each
with its one idempotency key (``refund:{txn}`` / ``void:{txn}``).

Life of a row: ``pending`` (transaction A, in the consuming handler) → ``in_flight``
(claimed by a worker round: lease + fencing token) → ``unknown`` (retry: look up first)
… → ``succeeded`` | ``failed`` (transaction B, with the resulting event in the outbox).
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
    PrimaryKeyConstraint,
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
from services.refunds import domain
from services.runtime.intents import Cause, emit_caused

metadata = MetaData()

#: the NOTIFY channel refunds workers listen on
CHANNEL = "paysaga_refunds_intents"

compensations = Table(
    "compensations",
    metadata,
    Column("transaction_id", Text, nullable=False),
    Column("action", String(8), nullable=False),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("reason", String(32), nullable=False),
    Column("order_id", String(64), nullable=False, index=True),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    #: the PaymentContext every resulting event carries
    Column("context", JSONB, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("claim_token", String(32), nullable=True),
    Column("cause_event_id", String(64), nullable=False),
    Column("cause_saga_seq", Integer, nullable=True),
    Column("correlation_id", Text, nullable=True),
    Column("refund_id", Text, nullable=True),
    Column("failure_reason", String(64), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("transaction_id", "action", name="pk_compensations"),
    CheckConstraint("action IN ('void', 'refund')", name="ck_compensations_action"),
    CheckConstraint(
        "state IN ('pending', 'in_flight', 'unknown', 'succeeded', 'failed')",
        name="ck_compensations_state",
    ),
    Index(
        "ix_compensations_due",
        "next_attempt_at",
        postgresql_where=text("state IN ('pending', 'unknown')"),
    ),
    Index("ix_compensations_leased", "lease_until", postgresql_where=text("state = 'in_flight'")),
)


async def record_intent(
    conn: AsyncConnection,
    context: PaymentContext,
    intent: domain.NewCompensation,
    cause: Cause,
    now: datetime,
) -> bool:
    """Transaction A (the consumer's): insert the (transaction, action) row; False if it
    exists — a redelivered or repeated trigger then causes no second gateway call."""
    inserted = await conn.execute(
        pg_insert(compensations)
        .values(
            transaction_id=context.transaction_id,
            action=intent.action,
            idempotency_key=intent.idempotency_key,
            reason=intent.reason,
            order_id=context.order_id,
            amount=context.amount,
            currency=context.currency,
            context=context.model_dump(mode="json"),
            state="pending",
            next_attempt_at=now,
            cause_event_id=cause.event_id,
            cause_saga_seq=cause.saga_seq,
            correlation_id=cause.correlation_id,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
        .returning(compensations.c.transaction_id)
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
    """Claim due rows and rows whose lease ran out, in one short transaction (``FOR
    UPDATE SKIP LOCKED``); it commits before any gateway call."""
    c = compensations.c
    due = (
        select(c.transaction_id, c.action, c.state.label("prior_state"))
        .where(
            or_(
                and_(c.state.in_(("pending", "unknown")), c.next_attempt_at <= now),
                and_(c.state == "in_flight", c.lease_until <= now),
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
                update(compensations)
                .where(c.transaction_id == due.c.transaction_id, c.action == due.c.action)
                .values(
                    state="in_flight",
                    attempts=c.attempts + 1,
                    lease_until=now + lease,
                    claim_token=token,
                    updated_at=now,
                )
                .returning(*c, due.c.prior_state)
            )
        ).all()
    return [_claimed(row, token) for row in rows]


def _claimed(row: Any, token: str) -> Claimed:
    return Claimed(
        claim=domain.Claim(
            transaction_id=row.transaction_id,
            action=cast(domain.Action, row.action),
            amount=row.amount,
            currency=row.currency,
            reason=cast(domain.Trigger, row.reason),
            prior_state=cast(domain.CompensationState, row.prior_state),
            attempt=row.attempts,
        ),
        idempotency_key=row.idempotency_key,
        context=PaymentContext.model_validate(row.context),
        cause=Cause(row.cause_event_id, row.cause_saga_seq, row.correlation_id),
        token=token,
    )


def _values(resolution: domain.Resolution) -> dict[str, Any]:
    match resolution:
        case domain.Succeeded(refund_id=refund_id):
            return {"state": "succeeded", "refund_id": refund_id}
        case domain.Failed(reason=reason):
            return {"state": "failed", "failure_reason": reason}
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
    """Transaction B: the round's resolution and its event (outbox), together. Fenced by
    the claim token: False — nothing written — if the lease was lost to another round."""
    c = compensations.c
    async with engine.begin() as conn:
        updated = await conn.execute(
            update(compensations)
            .where(
                c.transaction_id == claimed.claim.transaction_id,
                c.action == claimed.claim.action,
                c.state == "in_flight",
                c.claim_token == claimed.token,
            )
            .values(**_values(resolution), lease_until=None, claim_token=None, updated_at=now)
            .returning(c.transaction_id)
        )
        if updated.first() is None:
            return False
        if event is not None:
            await emit_caused(
                conn, claimed.cause, topic, event, key=claimed.context.order_id, now=now
            )
    return True
