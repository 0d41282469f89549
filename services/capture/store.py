"""The ``captures`` table: one row per transaction (its primary key), so a transaction
has at most one capture intent, under the one idempotency key ``capture:{txn}``.

Rows live as ``IntentStore`` describes; the final states are ``captured``,
``declined``, ``expired`` and ``failed``. A sale is recorded as ``sale_confirmed``.
``alerted_at`` is when ``CaptureFailed`` was emitted for a row that is still looked up
(its retry budget spent; see ``domain.Stalled``): it is emitted once per transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CheckConstraint, Column, DateTime, MetaData, String, Table, Text
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.events import PaymentContext
from services.capture import domain
from services.runtime.intents.store import (
    IntentStore,
    intent_columns,
    intent_indexes,
    unsettled_values,
)
from services.runtime.outbox import Cause

metadata = MetaData()

#: the NOTIFY channel capture workers listen on
CHANNEL = "paysaga_capture_intents"

captures = Table(
    "captures",
    metadata,
    Column("transaction_id", Text, primary_key=True),
    *intent_columns(),
    Column("authorized_at", DateTime(timezone=True), nullable=False),
    Column("capture_id", Text, nullable=True),
    #: decline code or failure reason of a final row
    Column("outcome_reason", String(64), nullable=True),
    #: when the alarm (CaptureFailed) was raised for a row still being looked up
    Column("alerted_at", DateTime(timezone=True), nullable=True),
    CheckConstraint(
        "state IN ('pending', 'in_flight', 'unknown', 'captured', 'declined', 'expired', "
        "'failed', 'sale_confirmed')",
        name="ck_captures_state",
    ),
    *intent_indexes("captures"),
)


def _claim(row: Any) -> domain.Claim:
    return domain.Claim(
        transaction_id=row.transaction_id,
        amount=row.amount,
        currency=row.currency,
        prior_state=cast(domain.CaptureState, row.prior_state),
        attempt=row.attempts,
        authorized_at=row.authorized_at,
        alerted=row.alerted_at is not None,
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
        case domain.Retry() | domain.Stalled():
            return unsettled_values(resolution)


INTENTS: IntentStore[domain.Claim, domain.Resolution] = IntentStore(
    captures, ("transaction_id",), _claim, _values
)


async def record_intent(
    conn: AsyncConnection,
    context: PaymentContext,
    intent: domain.NewCapture,
    cause: Cause,
    now: datetime,
) -> bool:
    """Transaction A (the StockReserved handler's): False if the transaction has a row
    already — a redelivered or re-emitted StockReserved then does nothing."""
    return await INTENTS.record(
        conn,
        context,
        cause,
        now,
        idempotency_key=intent.idempotency_key,
        state=intent.state,
        next_attempt_at=intent.next_attempt_at,
        authorized_at=intent.authorized_at,
    )
