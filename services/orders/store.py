"""The orders service's tables and queries (database ``paysaga_orders``).

Every write here runs on the connection of the record being handled, i.e. inside the
runtime's per-record (or per-batch) transaction: the projection, the applied-event
set, held events, the history and the outbox rows commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.events import AuditRecorded
from services.orders.domain import OrderView, StatusChange
from services.runtime import deferred, driver
from services.runtime.locks import xact_lock, xact_locks

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("customer_id", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("attempt", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("payment_intent_id", String(64), nullable=True),
    Column("transaction_id", String(200), nullable=True),
    Column("conference_id", Text, nullable=True),
    Column("version", Integer, nullable=False),
    #: [[attempt, kind], ...]: notifications already requested (OrderView.notified)
    Column("notified", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: Every saga event applied to an order, status-bearing or not: the causal gate's
#: "applied_ids" (any applied event can be the cause of a held one).
applied_events = Table(
    "applied_events",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("event_id", String(64), primary_key=True),
)

order_history = Table(
    "order_history",
    metadata,
    Column("order_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("status", String(32), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
)

#: Events that arrived before their cause (docs/saga-events.md, "Ordering in the status
#: projection"); ``id`` keeps arrival order among events of equal saga_seq.
held_events = Table(
    "held_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("order_id", String(64), nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("saga_seq", Integer, nullable=False),
    Column("causation_id", String(200), nullable=True),
    Column("event_type", String(64), nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("envelope", JSONB, nullable=False),
    Column("held_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ux_held_events_order_event", "order_id", "event_id", unique=True),
)

#: Append-only: a trigger (migration 0001) refuses UPDATE, DELETE and TRUNCATE.
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("action", String(200), nullable=False),
    Column("outcome", String(200), nullable=False),
    Column("reason", String(64), nullable=True),
    Column("order_id", String(200), nullable=True),
    Column("transaction_id", String(200), nullable=True),
    Column("gateway_event_id", String(200), nullable=True),
    Column("details", JSONB, nullable=False),
    Index("ix_audit_log_order_id", "order_id"),
)

# ------------------------------------------------------------------ the projection


@dataclass(frozen=True)
class OrderState:
    """What applying an event to an order starts from, read under the order's lock:
    its view (None before it is known), the ids of every event applied to it, and
    whether events of it are held."""

    view: OrderView | None
    applied: frozenset[str]
    has_early: bool


@dataclass
class _Known:
    """The orders a deferring transaction locked, and the states it read of them
    (``deferred.scoped``) — kept true by every write of this module, whose writes to
    the projection's tables are collected (``deferred``): read again from the database,
    a state would miss them."""

    locked: set[str] = field(default_factory=set)
    states: dict[str, OrderState] = field(default_factory=dict)


_LOCK_NAME = "orders:{}"
#: one round trip for the views, the applied-event sets and the held flags of orders
#: (a row even for an order without a view: it may have applied events all the same)
_LOAD_STATES = text(
    "SELECT k.id AS state_of,"
    " ARRAY(SELECT a.event_id FROM applied_events a WHERE a.order_id = k.id) AS applied_ids,"
    " EXISTS (SELECT 1 FROM held_events h WHERE h.order_id = k.id) AS has_early, o.*"
    " FROM unnest(CAST(:ids AS text[])) AS k(id) LEFT JOIN orders o ON o.order_id = k.id"
)
_LOAD_STATES_SQL = driver.sql_of(_LOAD_STATES)


async def prefetch(conn: AsyncConnection, order_ids: Iterable[str]) -> None:
    """Lock and read the orders a batch's events are about, in two statements for the
    batch instead of two per event: ``lock_order`` and ``load_state`` then answer from
    what the transaction knows. Nothing where writes go at once (``deferred.scoped``)."""
    known = deferred.scoped(conn, _Known)
    if known is None:
        return
    ids = sorted(set(order_ids) - known.locked)
    if not ids:
        return
    await xact_locks(conn, [_LOCK_NAME.format(i) for i in ids])
    known.locked.update(ids)
    # after the locks, in a statement of its own: its snapshot sees what the orders'
    # previous holders committed
    for row in await driver.rows(conn, _LOAD_STATES_SQL, {"ids": ids}):
        known.states[row.state_of] = _state_of(row)


async def lock_order(conn: AsyncConnection, order_id: str) -> None:
    """Serialize the handling of one order until the transaction ends.

    The four saga topics are co-partitioned, but the group's assignor may give the same
    partition number of two topics to different members, so one order's events can be
    handled concurrently. Without this, an event could be held by one transaction while
    its cause is applied (and held events released) by another that cannot see it."""
    known = deferred.scoped(conn, _Known)
    if known is not None and order_id in known.locked:
        return
    await xact_lock(conn, _LOCK_NAME.format(order_id))
    if known is not None:
        known.locked.add(order_id)


async def load_state(conn: AsyncConnection, order_id: str) -> OrderState:
    """The order's state, read under its lock (``lock_order``)."""
    known = deferred.scoped(conn, _Known)
    if known is not None and order_id in known.states:
        return known.states[order_id]
    [row] = await driver.rows(conn, _LOAD_STATES_SQL, {"ids": [order_id]})  # unnest of one id
    state = _state_of(row)
    if known is not None:
        known.states[order_id] = state
    return state


def _state_of(row: Any) -> OrderState:
    view = None
    if row.order_id is not None:
        view = OrderView(
            order_id=row.order_id,
            customer_id=row.customer_id,
            status=row.status,
            reason=row.reason,
            attempt=row.attempt,
            amount=row.amount,
            currency=row.currency,
            payment_intent_id=row.payment_intent_id,
            transaction_id=row.transaction_id,
            version=row.version,
            notified=frozenset((int(a), str(k)) for a, k in row.notified),
            conference_id=row.conference_id,
        )
    return OrderState(view, frozenset(row.applied_ids), bool(row.has_early))


def _learn(
    conn: AsyncConnection, order_id: str, change: Callable[[OrderState], OrderState]
) -> None:
    """Tell what the transaction knows of an order a write of this module changed."""
    known = deferred.scoped(conn, _Known)
    if known is None:
        return
    state = known.states.get(order_id)
    # the write may be collected: a read of the database would miss it from now on
    assert state is not None, "an order is read (load_state) before it is written"
    known.states[order_id] = change(state)


async def save_applied(
    conn: AsyncConnection,
    order_id: str,
    event_id: str,
    now: datetime,
    view: OrderView | None = None,
    change: StatusChange | None = None,
) -> None:
    """Record ``event_id`` as applied to the order, save its new ``view`` and, for a
    status ``change``, its history row — collected with the batch's other writes
    (``deferred``)."""
    await deferred.insert(
        conn,
        applied_events,
        {"order_id": order_id, "event_id": event_id},
        unique=["order_id", "event_id"],
    )
    if view is not None:
        row = {
            "order_id": order_id,
            "created_at": now,
            "customer_id": view.customer_id,
            "status": view.status,
            "reason": view.reason,
            "attempt": view.attempt,
            "amount": view.amount,
            "currency": view.currency,
            "payment_intent_id": view.payment_intent_id,
            "transaction_id": view.transaction_id,
            "conference_id": view.conference_id,
            "version": view.version,
            "notified": sorted([a, k] for a, k in view.notified),
            "updated_at": now,
        }
        await deferred.upsert(conn, orders, row, key=["order_id"], insert_only=["created_at"])
    if change is not None:
        assert view is not None, "a status change saves the view"
        history = {
            "order_id": order_id,
            "version": change.version,
            "status": change.status,
            "reason": change.reason,
            "at": now,
        }
        await deferred.insert(conn, order_history, history)
    _learn(
        conn,
        order_id,
        lambda s: replace(s, view=s.view if view is None else view, applied=s.applied | {event_id}),
    )


@dataclass(frozen=True)
class EarlyEvent:
    saga_seq: int
    event_id: str
    causation_id: str | None
    envelope: dict[str, Any]


async def keep_early(
    conn: AsyncConnection,
    order_id: str,
    envelope: dict[str, Any],
    payload: dict[str, Any],
    saga_seq: int,
    causation_id: str | None,
) -> None:
    await conn.execute(
        pg_insert(held_events)
        .values(
            order_id=order_id,
            event_id=envelope["event_id"],
            saga_seq=saga_seq,
            causation_id=causation_id,
            event_type=envelope["event_type"],
            payload=payload,
            envelope=envelope,
        )
        .on_conflict_do_nothing()
    )
    _learn(conn, order_id, lambda s: replace(s, has_early=True))


async def early_events_of(conn: AsyncConnection, order_id: str) -> list[EarlyEvent]:
    """The order's early events (table held_events) in arrival order."""
    rows = await conn.execute(
        select(
            held_events.c.saga_seq,
            held_events.c.event_id,
            held_events.c.causation_id,
            held_events.c.envelope,
        )
        .where(held_events.c.order_id == order_id)
        .order_by(held_events.c.id)
    )
    return [EarlyEvent(r.saga_seq, r.event_id, r.causation_id, r.envelope) for r in rows]


async def drop_early(
    conn: AsyncConnection, order_id: str, event_ids: list[str], *, others_held: bool
) -> None:
    """Drop the order's held events ``event_ids``; ``others_held``: whether it still
    has held events besides them."""
    await conn.execute(
        delete(held_events).where(
            and_(held_events.c.order_id == order_id, held_events.c.event_id.in_(event_ids))
        )
    )
    _learn(conn, order_id, lambda s: replace(s, has_early=others_held))


async def count_early(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.count()).select_from(held_events))).scalar_one())


# ------------------------------------------------------------------ audit


async def append_audit(
    conn: AsyncConnection, event_id: str, occurred_at: datetime, audit: AuditRecorded, now: datetime
) -> None:
    """Insert once per event id (a repeat changes nothing); rows are never changed.
    Collected with the batch's other writes (``deferred``)."""
    row = {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "recorded_at": now,
        **audit.model_dump(mode="json"),
    }
    await deferred.insert(conn, audit_log, row, unique=["event_id"])


# ------------------------------------------------------------------ the status API


async def read_order(conn: AsyncConnection, order_id: str) -> dict[str, Any] | None:
    """The order and its history up to the order's version: the two reads may straddle
    a commit, and history past the row read would contradict it."""
    row = (await conn.execute(select(orders).where(orders.c.order_id == order_id))).first()
    if row is None:
        return None
    history = await conn.execute(
        select(order_history.c.status, order_history.c.reason, order_history.c.at)
        .where(order_history.c.order_id == order_id, order_history.c.version <= row.version)
        .order_by(order_history.c.version)
    )
    return {
        "order_id": row.order_id,
        "status": row.status,
        "reason": row.reason,
        "amount": row.amount,
        "currency": row.currency,
        "payment_intent_id": row.payment_intent_id,
        "transaction_id": row.transaction_id,
        "updated_at": cast(datetime, row.updated_at).astimezone(UTC),
        "history": [
            {"status": h.status, "reason": h.reason, "at": cast(datetime, h.at).astimezone(UTC)}
            for h in history
        ],
    }
