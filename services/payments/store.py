"""The payments database: orders as payments knows them, stored confirmations, the
unmatched-payments store, the gateway events already seen, and the payment requests'
table (its intents' life: ``request_store.py``).

Card data never reaches these tables: a confirmation is stored only after it was
checked card-free, and then only its business fields (payment method brand and last4).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

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
    UniqueConstraint,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.payments.domain import Confirmation, Item, Order
from services.runtime.intents.store import intent_columns, intent_indexes
from services.runtime.locks import xact_lock

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("customer_id", String(64), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("total_amount", BigInteger, nullable=False),
    #: None while the attempt's payment is being requested from the gateway
    Column("payment_intent_id", String(64), nullable=True),
    Column("payment_method", String(32), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("items", JSONB, nullable=False),
    Column("correlation_id", String(64), nullable=True),
    Column("content_hash", String(64), nullable=False),
    #: the order's status as published on orders.status.v1 (mirrored, with its version)
    Column("saga_status", String(32), nullable=True),
    Column("saga_version", Integer, nullable=False, server_default="0"),
    #: a PaymentRetryRequested that arrived while the attempt was still in flight
    Column("pending_retry", JSONB, nullable=True),
    #: the payment intents of the attempts before the current one (a JSON list)
    Column("earlier_intents", JSONB, nullable=False, server_default="[]"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_orders_payment_intent", "payment_intent_id"),
)


#: accepted and declined confirmations (the durable record behind PAYMENT_AUTHORIZED)
def _confirmation_columns() -> list[Column[Any]]:
    """What is kept of a verified, card-free confirmation (both tables below)."""
    return [
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("gateway", String(64), nullable=False),
        Column("gateway_event_id", String(128), nullable=False),
        Column("type", String(32), nullable=False),
        Column("transaction_id", String(64), nullable=False),
        Column("payment_intent_id", String(64), nullable=False),
        Column("amount", BigInteger, nullable=False),
        Column("currency", String(3), nullable=False),
        Column("payment_method_type", String(32), nullable=False),
        Column("brand", String(32), nullable=True),
        Column("last4", String(4), nullable=True),
        Column("received_at", DateTime(timezone=True), nullable=False),
    ]


def _confirmation_values(c: Confirmation) -> dict[str, Any]:
    return {
        "gateway": c.gateway,
        "gateway_event_id": c.gateway_event_id,
        "type": c.type,
        "transaction_id": c.transaction_id,
        "payment_intent_id": c.payment_intent_id,
        "amount": c.amount,
        "currency": c.currency,
        "payment_method_type": c.payment_method_type,
        "brand": c.brand,
        "last4": c.last4,
        "received_at": c.record_time,
    }


confirmations = Table(
    "confirmations",
    metadata,
    *_confirmation_columns(),
    Column("order_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("stored_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("transaction_id", "type", name="uq_confirmations_txn_type"),
)

#: confirmations that matched no order (yet)
unmatched = Table(
    "unmatched_payments",
    metadata,
    *_confirmation_columns(),
    Column("order_id", String(64), nullable=True),
    Column("failure_code", String(64), nullable=True),
    Column("failure_message", Text, nullable=True),
    Column("parked_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    #: parked | matched | resolved_order | refund_pending | resolved_refund | rejected;
    #: only ``parked`` is ever matched (``parked_for``)
    Column("state", String(16), nullable=False, server_default="parked"),
    Column("resolution", Text, nullable=True),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    #: an operator's void/refund, recorded (``refund_pending``) before the gateway call:
    #: its one idempotency key (``void:{txn}`` / ``refund:{txn}``) and when it was asked
    Column("refund_key", Text, nullable=True),
    Column("refund_requested_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("transaction_id", "type", name="uq_unmatched_txn_type"),
    Index("ix_unmatched_intent", "payment_intent_id", postgresql_where="state = 'parked'"),
)

#: every signature-verified gateway event id: the contract's first duplicate rule
seen_gateway_events = Table(
    "seen_gateway_events",
    metadata,
    Column("gateway", String(64), primary_key=True),
    Column("gateway_event_id", String(128), primary_key=True),
    Column("seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


def order_from_row(row: Any) -> Order:
    return Order(
        order_id=row.order_id,
        customer_id=row.customer_id,
        currency=row.currency,
        total_amount=row.total_amount,
        payment_intent_id=row.payment_intent_id,
        payment_method=row.payment_method,
        attempt=row.attempt,
        status=row.status,
        items=tuple(Item(i["sku"], i["quantity"]) for i in row.items),
        correlation_id=row.correlation_id,
        content_hash=row.content_hash,
        earlier_intents=tuple(row.earlier_intents),
    )


def _order_values(order: Order) -> dict[str, Any]:
    return {
        "customer_id": order.customer_id,
        "currency": order.currency,
        "total_amount": order.total_amount,
        "payment_intent_id": order.payment_intent_id,
        "payment_method": order.payment_method,
        "attempt": order.attempt,
        "status": order.status,
        "items": [{"sku": i.sku, "quantity": i.quantity} for i in order.items],
        "correlation_id": order.correlation_id,
        "content_hash": order.content_hash,
        "earlier_intents": list(order.earlier_intents),
        "updated_at": func.now(),
    }


async def lock_intent(conn: AsyncConnection, payment_intent_id: str) -> None:
    """Serialize, until the transaction ends, everything that parks or matches payments
    of one payment intent (a transaction-scoped advisory lock; re-entrant)."""
    await xact_lock(conn, f"payments:intent:{payment_intent_id}")


async def attempt_confirmed(conn: AsyncConnection, order_id: str, attempt: int) -> bool:
    """Whether a confirmation (accepted or declined) of that attempt is stored."""
    found = await conn.execute(
        select(confirmations.c.id)
        .where(confirmations.c.order_id == order_id, confirmations.c.attempt == attempt)
        .limit(1)
    )
    return found.first() is not None


async def load_order(conn: AsyncConnection, order_id: str, *, lock: bool = True) -> Any:
    stmt = select(orders).where(orders.c.order_id == order_id)
    return (await conn.execute(stmt.with_for_update() if lock else stmt)).first()


async def load_order_by_intent(conn: AsyncConnection, payment_intent_id: str) -> Any:
    stmt = select(orders).where(orders.c.payment_intent_id == payment_intent_id).with_for_update()
    return (await conn.execute(stmt)).first()


async def insert_order(conn: AsyncConnection, order: Order) -> bool:
    """False if the order id exists already (a concurrent or earlier OrderPlaced)."""
    result = await conn.execute(
        pg_insert(orders)
        .values(order_id=order.order_id, **_order_values(order))
        .on_conflict_do_nothing()
        .returning(orders.c.order_id)
    )
    return result.first() is not None


async def save_order(conn: AsyncConnection, order: Order, **extra: Any) -> None:
    await conn.execute(
        update(orders)
        .where(orders.c.order_id == order.order_id)
        .values(**_order_values(order), **extra)
    )


async def set_order_fields(conn: AsyncConnection, order_id: str, **values: Any) -> None:
    await conn.execute(update(orders).where(orders.c.order_id == order_id).values(**values))


async def mark_seen(conn: AsyncConnection, gateway: str, gateway_event_id: str) -> bool:
    """True the first time a verified gateway event id is seen."""
    result = await conn.execute(
        pg_insert(seen_gateway_events)
        .values(gateway=gateway, gateway_event_id=gateway_event_id)
        .on_conflict_do_nothing()
        .returning(seen_gateway_events.c.gateway_event_id)
    )
    return result.first() is not None


async def transaction_known(conn: AsyncConnection, transaction_id: str, type_: str) -> bool:
    """The contract's second duplicate rule: same transaction id and type."""
    for table in (confirmations, unmatched):
        found = await conn.execute(
            select(table.c.id).where(
                table.c.transaction_id == transaction_id, table.c.type == type_
            )
        )
        if found.first() is not None:
            return True
    return False


async def store_confirmation(
    conn: AsyncConnection, c: Confirmation, order: Order, outcome: str
) -> bool:
    """Store an accepted/declined confirmation; False if (transaction, type) exists."""
    result = await conn.execute(
        pg_insert(confirmations)
        .values(
            **_confirmation_values(c),
            order_id=order.order_id,
            attempt=order.attempt,
            outcome=outcome,
        )
        .on_conflict_do_nothing()
        .returning(confirmations.c.id)
    )
    return result.first() is not None


async def park(conn: AsyncConnection, c: Confirmation) -> bool:
    result = await conn.execute(
        pg_insert(unmatched)
        .values(
            **_confirmation_values(c),
            order_id=c.order_id,
            failure_code=c.failure_code,
            failure_message=c.failure_message,
        )
        .on_conflict_do_nothing()
        .returning(unmatched.c.id)
    )
    return result.first() is not None


def confirmation_from_unmatched(row: Any) -> Confirmation:
    return Confirmation(
        gateway=row.gateway,
        gateway_event_id=row.gateway_event_id,
        type=row.type,
        transaction_id=row.transaction_id,
        payment_intent_id=row.payment_intent_id,
        order_id=row.order_id,
        amount=row.amount,
        currency=row.currency,
        payment_method_type=row.payment_method_type,
        brand=row.brand,
        last4=row.last4,
        failure_code=row.failure_code,
        failure_message=row.failure_message,
        record_time=row.received_at,
    )


async def parked_for(conn: AsyncConnection, order: Order) -> list[Any]:
    """Parked confirmations that may belong to ``order`` (its intent), locked. Only
    ``parked`` ones: a payment an operator is giving back (``refund_pending``) or gave
    back (``resolved_refund``) is never matched."""
    rows = await conn.execute(
        select(unmatched)
        .where(
            unmatched.c.state == "parked", unmatched.c.payment_intent_id == order.payment_intent_id
        )
        .order_by(unmatched.c.received_at, unmatched.c.id)
        .with_for_update()
    )
    return list(rows)


async def given_back_for(conn: AsyncConnection, order: Order) -> list[Any]:
    """Payments of ``order``'s intent (naming no order, or this one) that an operator is
    giving back or gave back: ``refund_pending`` / ``resolved_refund`` (a failed payment
    so resolved took no money, so gave none back)."""
    rows = await conn.execute(
        select(unmatched)
        .where(
            unmatched.c.state.in_(("refund_pending", "resolved_refund")),
            unmatched.c.type != "payment.failed",
            unmatched.c.payment_intent_id == order.payment_intent_id,
            or_(unmatched.c.order_id.is_(None), unmatched.c.order_id == order.order_id),
        )
        .order_by(unmatched.c.id)
    )
    return list(rows)


#: the states of an unmatched payment that wait (for its order, or for an operator)
UNMATCHED_OPEN = ("parked", "refund_pending")


async def count_unmatched_open(conn: AsyncConnection) -> dict[str, int]:
    """Unmatched payments by open state (``UNMATCHED_OPEN``; 0 where none)."""
    rows = await conn.execute(
        select(unmatched.c.state, func.count())
        .where(unmatched.c.state.in_(UNMATCHED_OPEN))
        .group_by(unmatched.c.state)
    )
    counts = {state: 0 for state in UNMATCHED_OPEN}
    counts.update({state: int(n) for state, n in rows.all()})
    return counts


async def lock_unmatched(conn: AsyncConnection, unmatched_id: int) -> Any:
    """The unmatched row, locked after its intent (the order ``_match_parked`` locks in);
    None if there is no such row."""
    intent = await conn.scalar(
        select(unmatched.c.payment_intent_id).where(unmatched.c.id == unmatched_id)
    )
    if intent is None:
        return None
    await lock_intent(conn, intent)
    stmt = select(unmatched).where(unmatched.c.id == unmatched_id).with_for_update()
    return (await conn.execute(stmt)).first()


async def request_refund(
    conn: AsyncConnection, unmatched_id: int, idempotency_key: str, now: datetime
) -> None:
    """Take a parked payment out of matching: its void/refund is about to be sent."""
    await conn.execute(
        update(unmatched)
        .where(unmatched.c.id == unmatched_id, unmatched.c.state == "parked")
        .values(
            state="refund_pending",
            refund_key=idempotency_key,
            refund_requested_at=now,
            resolution=f"key {idempotency_key}",
        )
    )


async def cancel_refund(conn: AsyncConnection, unmatched_id: int, resolution: str) -> None:
    """The gateway did not give the money back (declined, unknown transaction): the
    payment is parked again, matchable as before."""
    await conn.execute(
        update(unmatched)
        .where(unmatched.c.id == unmatched_id, unmatched.c.state == "refund_pending")
        .values(state="parked", refund_key=None, refund_requested_at=None, resolution=resolution)
    )


async def awaiting_order_of(conn: AsyncConnection, c: Confirmation) -> str | None:
    """The registered order still awaiting a payment of ``c``'s intent (and of its order,
    when it names one), if any: one that arrived while the payment was out of matching."""
    stmt = select(orders.c.order_id).where(
        orders.c.payment_intent_id == c.payment_intent_id, orders.c.status == "pending"
    )
    if c.order_id is not None:
        stmt = stmt.where(orders.c.order_id == c.order_id)
    return await conn.scalar(stmt.limit(1))


async def close_unmatched(
    conn: AsyncConnection,
    transaction_id: str,
    type_: str,
    state: str,
    resolution: str,
    now: datetime,
) -> None:
    await conn.execute(
        update(unmatched)
        .where(unmatched.c.transaction_id == transaction_id, unmatched.c.type == type_)
        .values(state=state, resolution=resolution, resolved_at=now)
    )


def content_hash(payload: dict[str, Any]) -> str:
    import hashlib

    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


# --- payment requests (docs/contract.md §3.7) ----------------------------------------------

#: one row per attempt that came without a payment_intent_id; its life is
#: ``IntentStore``'s, with the final states requested, refused and failed. The client
#: secret is never stored here (see ``requests.Requested``).
payment_requests = Table(
    "payment_requests",
    metadata,
    Column("attempt", Integer, nullable=False),
    *intent_columns(),
    Column("payment_method", String(32), nullable=False),
    Column("payment_intent_id", String(64), nullable=True),
    Column("expires_at", Text, nullable=True),
    #: the gateway's refusal code, or why automatic handling ended
    Column("outcome_reason", String(64), nullable=True),
    PrimaryKeyConstraint("order_id", "attempt"),
    CheckConstraint(
        "state IN ('pending', 'in_flight', 'unknown', 'requested', 'refused', 'failed')",
        name="ck_payment_requests_state",
    ),
    *intent_indexes("payment_requests"),
)
