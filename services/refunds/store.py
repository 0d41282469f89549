"""The ``compensations`` table: one row per (transaction_id, action) — its primary key
is what makes "never two refunds (or voids) of one transaction" a database rule — each
with its one idempotency key (``refund:{txn}`` / ``void:{txn}``).

Rows live as ``IntentStore`` describes; the final states are ``succeeded`` and
``failed``. ``alerted_at`` is when ``CompensationFailed`` was emitted for a row that is
still looked up (its rounds spent with the outcome unknown; see ``domain.Stalled``): it
is emitted once per compensation.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.events import PaymentContext
from services.refunds import domain
from services.runtime.intents.store import (
    IntentStore,
    intent_columns,
    intent_indexes,
    unsettled_values,
)
from services.runtime.outbox import Cause

metadata = MetaData()

#: the NOTIFY channel refunds workers listen on
CHANNEL = "paysaga_refunds_intents"

compensations = Table(
    "compensations",
    metadata,
    Column("transaction_id", Text, nullable=False),
    Column("action", String(8), nullable=False),
    Column("reason", String(32), nullable=False),
    *intent_columns(),
    Column("refund_id", Text, nullable=True),
    Column("failure_reason", String(64), nullable=True),
    #: when the alarm (CompensationFailed) was raised for a row still being looked up
    Column("alerted_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("transaction_id", "action", name="pk_compensations"),
    CheckConstraint("action IN ('void', 'refund')", name="ck_compensations_action"),
    CheckConstraint(
        "state IN ('pending', 'in_flight', 'unknown', 'succeeded', 'failed')",
        name="ck_compensations_state",
    ),
    *intent_indexes("compensations"),
)


def _claim(row: Any) -> domain.Claim:
    return domain.Claim(
        transaction_id=row.transaction_id,
        action=cast(domain.Action, row.action),
        amount=row.amount,
        currency=row.currency,
        reason=cast(domain.Trigger, row.reason),
        prior_state=cast(domain.CompensationState, row.prior_state),
        attempt=row.attempts,
        alerted=row.alerted_at is not None,
    )


def _values(resolution: domain.Resolution) -> dict[str, Any]:
    match resolution:
        case domain.Succeeded(refund_id=refund_id):
            return {"state": "succeeded", "refund_id": refund_id}
        case domain.Failed(reason=reason):
            return {"state": "failed", "failure_reason": reason}
        case domain.Retry() | domain.Stalled():
            return unsettled_values(resolution)


INTENTS: IntentStore[domain.Claim, domain.Resolution] = IntentStore(
    compensations, ("transaction_id", "action"), _claim, _values
)


async def record_intent(
    conn: AsyncConnection,
    context: PaymentContext,
    intent: domain.NewCompensation,
    cause: Cause,
    now: datetime,
) -> bool:
    """Transaction A (the consuming handler's): False if the (transaction, action) row
    exists — a redelivered or repeated trigger then causes no second gateway call."""
    return await INTENTS.record(
        conn,
        context,
        cause,
        now,
        action=intent.action,
        idempotency_key=intent.idempotency_key,
        reason=intent.reason,
        state="pending",
        next_attempt_at=now,
    )
