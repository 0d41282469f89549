"""The payments database: orders as payments knows them, stored confirmations, the
unmatched-payments store, the gateway events already seen, and the payment requests'
table. Here: the tables and the orders. A confirmation's unit of work (one call loads
what its decision needs, one statement saves the result) is in ``confirmation_store.py``;
the unmatched payments' matching and operator queries in ``unmatched_store.py``; the
payment requests' life in ``request_store.py``.

Card data never reaches these tables: a confirmation is stored only after it was
checked card-free, and then only its business fields (payment method brand and last4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
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
    bindparam,
    case,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.payments.domain import Confirmation, Item, Order
from services.runtime import deferred, driver
from services.runtime.bound import bound, prefixed
from services.runtime.intents.store import intent_columns, intent_indexes
from services.runtime.locks import XACT_LOCK_EXPRESSION, xact_lock

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


#: what is kept of a confirmation (``confirmation_values``)
CONFIRMATION_FIELDS = (
    "gateway",
    "gateway_event_id",
    "type",
    "transaction_id",
    "payment_intent_id",
    "amount",
    "currency",
    "payment_method_type",
    "brand",
    "last4",
    "received_at",
)


def confirmation_values(c: Confirmation) -> dict[str, Any]:
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
    #: only ``parked`` is ever matched (``unmatched_store.load_unmatched_of``, which also
    #: reads the intent's given-back payments: the index serves every state)
    Column("state", String(16), nullable=False, server_default="parked"),
    Column("resolution", Text, nullable=True),
    Column("resolved_at", DateTime(timezone=True), nullable=True),
    #: an operator's void/refund, recorded (``refund_pending``) before the gateway call:
    #: its one idempotency key (``void:{txn}`` / ``refund:{txn}``) and when it was asked
    Column("refund_key", Text, nullable=True),
    Column("refund_requested_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("transaction_id", "type", name="uq_unmatched_txn_type"),
    Index("ix_unmatched_intent", "payment_intent_id"),
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


#: the columns of an order's state (``order_values``), besides its id
ORDER_FIELDS = (
    "customer_id",
    "currency",
    "total_amount",
    "payment_intent_id",
    "payment_method",
    "attempt",
    "status",
    "items",
    "correlation_id",
    "content_hash",
    "earlier_intents",
)


def order_values(order: Order) -> dict[str, Any]:
    """The order's state, column by column (``ORDER_FIELDS``); a statement that stores
    it sets ``updated_at`` too."""
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
    }


def content_hash(payload: dict[str, Any]) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


# --- orders ------------------------------------------------------------------------


def intent_lock(payment_intent_id: str) -> str:
    return f"payments:intent:{payment_intent_id}"


@dataclasses.dataclass
class _IntentsLocked:
    """The intents whose lock the transaction holds (taken in a statement that did other
    work too): ``lock_intent`` sends nothing for them."""

    intents: set[str] = dataclasses.field(default_factory=set)


async def lock_intent(conn: AsyncConnection, payment_intent_id: str) -> None:
    """Serialize, until the transaction ends, everything that keeps or matches unmatched
    payments of one payment intent (a transaction-scoped advisory lock; re-entrant)."""
    locked = deferred.scoped(conn, _IntentsLocked)
    if locked is not None and payment_intent_id in locked.intents:
        return
    await xact_lock(conn, intent_lock(payment_intent_id))


# The hot path's statements are built once: each execution only binds its values.

_LOAD_ORDER = select(orders).where(orders.c.order_id == bindparam("order_id")).with_for_update()
_LOAD_ORDER_BY_INTENT = (
    select(orders).where(orders.c.payment_intent_id == bindparam("intent")).with_for_update()
)
#: a new order (``:o_*``), if its id is new
_INSERT_ORDER = (
    pg_insert(orders)
    .values(bound(orders, ("order_id", *ORDER_FIELDS), "o_"))
    .on_conflict_do_nothing()
    .returning(orders.c.order_id)
)
#: the same, then the lock ``:lock_name`` once the row is in
_inserted = _INSERT_ORDER.cte("inserted")
_INSERT_ORDER_LOCKING = select(_inserted.c.order_id, XACT_LOCK_EXPRESSION)
_INSERT_ORDER_SQL = driver.sql_of(_INSERT_ORDER)
_INSERT_ORDER_LOCKING_SQL = driver.sql_of(_INSERT_ORDER_LOCKING)


async def load_order(conn: AsyncConnection, order_id: str) -> Any:
    """The order's row, locked; None if the order is unknown."""
    return (await conn.execute(_LOAD_ORDER, {"order_id": order_id})).first()


async def load_order_by_intent(conn: AsyncConnection, payment_intent_id: str) -> Any:
    return (await conn.execute(_LOAD_ORDER_BY_INTENT, {"intent": payment_intent_id})).first()


async def insert_order(conn: AsyncConnection, order: Order) -> bool:
    """False if the order id exists already (a concurrent or earlier OrderPlaced). An
    order inserted with a payment intent holds that intent's lock too, taken by the same
    statement once the row is in (``lock_intent``: before its unmatched payments are
    read, in a statement of their own)."""
    params = prefixed({"order_id": order.order_id, **order_values(order)}, "o_")
    intent = order.payment_intent_id
    if intent is None:
        return bool(await driver.rows(conn, _INSERT_ORDER_SQL, params))
    params["lock_name"] = intent_lock(intent)
    if not await driver.rows(conn, _INSERT_ORDER_LOCKING_SQL, params):
        return False
    locked = deferred.scoped(conn, _IntentsLocked)
    if locked is not None:
        locked.intents.add(intent)
    return True


async def save_order(conn: AsyncConnection, order: Order, **fields: Any) -> None:
    """One update of the order's row: ``order``'s state and the other columns in
    ``fields`` (``saga_status``, ``saga_version``, ``pending_retry``)."""
    await conn.execute(
        update(orders)
        .where(orders.c.order_id == order.order_id)
        .values(**order_values(order), **fields, updated_at=func.now())
    )


_c = orders.c
#: ``record_saga_status``'s statement (``:s_*``)
_RECORD_SAGA_STATUS = (
    update(orders)
    .where(
        _c.order_id == bindparam("s_order_id"),
        _c.saga_version < bindparam("s_version", type_=Integer),
        _c.pending_retry.is_(None),
    )
    .values(
        saga_version=bindparam("s_version", type_=Integer),
        saga_status=case(
            (
                _c.payment_intent_id.is_not_distinct_from(bindparam("s_intent", type_=String)),
                bindparam("s_status", type_=String),
            ),
            else_=_c.saga_status,
        ),
    )
    .returning(_c.order_id)
)


async def record_saga_status(
    conn: AsyncConnection, order_id: str, version: int, payment_intent_id: str | None, status: str
) -> bool:
    """One statement for a published status that changes nothing but the mirror: a
    newer ``version`` of an order with no pending retry is recorded — with its status if
    it is about the current attempt (``payment_intent_id``). False (nothing written)
    when the order is unknown, the version not newer, or a retry pending: then the
    status is decided on the loaded order. The row lock is taken as ``load_order``'s."""
    params = {"s_order_id": order_id, "s_version": version, "s_intent": payment_intent_id}
    result = await conn.execute(_RECORD_SAGA_STATUS, {**params, "s_status": status})
    return result.first() is not None


#: ``record_saga_status`` for a batch's statuses at once: the orders without a pending
#: retry locked (in order id order), each recorded as the statuses one after another
#: leave it. A status is recorded in its turn only if its version is newer than the
#: stored one and than every one before it (``before``: else it is stale by then, though
#: the newer one was about an earlier attempt); of those recorded, the newest version
#: stays, with the status of the newest one about the current attempt. The orders locked
#: are returned: every given status of theirs is recorded or stale; the others'
#: (unknown, or a retry pending) are decided one by one.
_RECORD_SAGA_STATUSES = text(
    "WITH s AS (SELECT * FROM unnest(CAST(:order_ids AS text[]), CAST(:versions AS int[]),"
    " CAST(:intents AS text[]), CAST(:statuses AS text[])) WITH ORDINALITY"
    " AS s(order_id, version, intent, status, ord)),"
    " o AS (SELECT order_id, saga_version, payment_intent_id FROM orders"
    " WHERE order_id IN (SELECT order_id FROM s) AND pending_retry IS NULL"
    " ORDER BY order_id FOR UPDATE),"
    " t AS (SELECT o.order_id, o.saga_version AS stored, o.payment_intent_id AS current,"
    " s.version, s.intent, s.status, max(s.version) OVER (PARTITION BY s.order_id"
    " ORDER BY s.ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before"
    " FROM o JOIN s USING (order_id)),"
    " m AS (SELECT order_id, max(version) AS version,"
    " (array_agg(status ORDER BY version DESC)"
    " FILTER (WHERE intent IS NOT DISTINCT FROM current))[1] AS status"
    " FROM t WHERE version > stored AND (before IS NULL OR version > before)"
    " GROUP BY order_id),"
    " u AS (UPDATE orders SET saga_version = m.version,"
    " saga_status = COALESCE(m.status, orders.saga_status)"
    " FROM m WHERE orders.order_id = m.order_id AND orders.saga_version < m.version)"
    " SELECT order_id FROM o"
)


async def record_saga_statuses(
    conn: AsyncConnection, statuses: Sequence[tuple[str, int, str | None, str]]
) -> set[str]:
    """``record_saga_status`` for many (order id, version, payment intent id, status) in
    one statement (``_RECORD_SAGA_STATUSES``): the orders whose statuses it settled."""
    if not statuses:
        return set()
    order_ids, versions, intents, names = (list(c) for c in zip(*statuses, strict=True))
    params = {"order_ids": order_ids, "versions": versions, "intents": intents, "statuses": names}
    return set((await conn.execute(_RECORD_SAGA_STATUSES, params)).scalars())


async def set_order_fields(conn: AsyncConnection, order_id: str, **fields: Any) -> None:
    await conn.execute(update(orders).where(orders.c.order_id == order_id).values(**fields))


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
