"""A gateway confirmation's unit of work: one call loads what deciding it needs
(``load_for_confirmation``: the duplicate rules, the intent's lock, the order), the pure
``domain.decide_confirmation`` decides, one statement saves the result
(``save_confirmation``), and the handler emits.

Card data never reaches these tables: a confirmation is stored only after it was
checked card-free, and then only its business fields (payment method brand and last4).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, exists, func, literal_column, select, text, true, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.payments.domain import Confirmation, Decision, Order
from services.payments.store import (
    CONFIRMATION_FIELDS,
    ORDER_FIELDS,
    confirmation_values,
    confirmations,
    intent_lock,
    order_from_row,
    order_values,
    orders,
    unmatched,
)
from services.runtime import driver
from services.runtime.bound import bound, prefixed
from services.runtime.locks import XACT_LOCK_SQL


@dataclasses.dataclass(frozen=True, slots=True)
class ConfirmationState:
    """What deciding a first-seen confirmation needs: its order (the one it names, else
    the one of its intent), locked, and whether a confirmation of that order's current
    attempt is stored already (only looked up for a ``flagged`` order; True otherwise)."""

    order: Order | None
    attempt_confirmed: bool


#: the contract's two duplicate rules (a gateway event id seen before; a stored or
#: unmatched confirmation of the same transaction and type) and, for a first-seen
#: confirmation, the intent's lock (``lock_intent``), in one statement. This and the
#: order's read run on the driver's connection (every confirmation sends them)
_FIRST_SEEN = text(
    f"""
    WITH seen AS (
        INSERT INTO seen_gateway_events (gateway, gateway_event_id)
        VALUES (:gateway, :gateway_event_id)
        ON CONFLICT DO NOTHING
        RETURNING 1
    ), first AS (
        SELECT EXISTS (SELECT FROM seen)
            AND NOT EXISTS (SELECT FROM confirmations
                            WHERE transaction_id = :transaction_id AND type = :type)
            AND NOT EXISTS (SELECT FROM unmatched_payments
                            WHERE transaction_id = :transaction_id AND type = :type)
            AS first
    )
    SELECT first, CASE WHEN first THEN (SELECT 1 FROM {XACT_LOCK_SQL}) END FROM first
    """  # noqa: S608 (a constant: the lock's name is a bound parameter)
)
_FIRST_SEEN_SQL = driver.sql_of(_FIRST_SEEN)


def _locked_order(named: Any) -> Any:
    """The order ``named``, locked, with whether its attempt's confirmation is stored
    (``ConfirmationState``)."""
    stored = exists().where(
        confirmations.c.order_id == orders.c.order_id,
        confirmations.c.attempt == orders.c.attempt,
    )
    confirmed = case((orders.c.status == literal_column("'flagged'"), stored), else_=true())
    return driver.sql_of(
        select(orders, confirmed.label("attempt_confirmed")).where(named).with_for_update(of=orders)
    )


_ORDER_NAMED_SQL = _locked_order(orders.c.order_id == bindparam("order_id"))
_ORDER_OF_INTENT_SQL = _locked_order(orders.c.payment_intent_id == bindparam("intent"))


async def load_for_confirmation(conn: AsyncConnection, c: Confirmation) -> ConfirmationState | None:
    """None for a duplicate; else the state to decide ``c`` on, loaded with the intent's
    lock held. The lock serializes keeping a payment unmatched with the registration of
    its intent's order (``unmatched_store.load_unmatched_of``), which may run
    concurrently on another partition or instance: under READ COMMITTED each could
    otherwise miss the other's uncommitted row. So the order is read in a statement of
    its own, after the lock is granted."""
    [(first, _)] = await driver.rows(
        conn,
        _FIRST_SEEN_SQL,
        {
            "gateway": c.gateway,
            "gateway_event_id": c.gateway_event_id,
            "transaction_id": c.transaction_id,
            "type": c.type,
            "lock_name": intent_lock(c.payment_intent_id),
        },
    )
    if not first:
        return None
    if c.order_id:
        found = await driver.rows(conn, _ORDER_NAMED_SQL, {"order_id": c.order_id})
    else:
        found = await driver.rows(conn, _ORDER_OF_INTENT_SQL, {"intent": c.payment_intent_id})
    if not found:
        return ConfirmationState(None, True)
    row = found[0]
    return ConfirmationState(order_from_row(row), bool(row.attempt_confirmed))


@dataclasses.dataclass(frozen=True, slots=True)
class Closing:
    """How a payment leaves the unmatched store: its final state and resolution."""

    state: str
    resolution: str
    at: datetime


async def save_confirmation(
    conn: AsyncConnection, c: Confirmation, decision: Decision, closing: Closing | None = None
) -> None:
    """The result of deciding ``c``, in one statement: a payment that matched no order
    (``parked``) is kept unmatched; one that settles its order (accepted, declined) is
    stored with the order's new state; a rejection stores nothing. ``closing``: ``c``
    comes from the unmatched store and leaves it, whatever the decision."""
    closed = _closed(c, closing) if closing is not None else None
    if decision.order is not None:
        order = decision.order
        params = {
            **prefixed(confirmation_values(c), "c_"),
            **prefixed({"order_id": order.order_id, **order_values(order)}, "o_"),
            "c_order_id": order.order_id,
            "c_attempt": order.attempt,
            "c_outcome": decision.outcome,
        }
        if closed is None:
            await driver.execute(conn, _SETTLED_SQL, params)
            return
        await conn.execute(_SETTLED.add_cte(closed.returning(unmatched.c.id).cte("closed")), params)
    elif closed is not None:
        await conn.execute(closed)
    elif decision.outcome == "parked":
        params = prefixed(
            {
                **confirmation_values(c),
                "order_id": c.order_id,
                "failure_code": c.failure_code,
                "failure_message": c.failure_message,
            },
            "p_",
        )
        await conn.execute(_PARKED, params)


# ``save_confirmation``'s statements, built once: each execution only binds its values

#: a confirmation that settles its order (``:c_*``), stored with the order's new state
#: (``:o_*``)
_SETTLED = (
    update(orders)
    .where(orders.c.order_id == bindparam("o_order_id"))
    .values({**bound(orders, ORDER_FIELDS, "o_"), orders.c.updated_at: func.now()})
    .add_cte(
        pg_insert(confirmations)
        .values(
            bound(confirmations, (*CONFIRMATION_FIELDS, "order_id", "attempt", "outcome"), "c_")
        )
        .on_conflict_do_nothing()
        .returning(confirmations.c.id)
        .cte("stored")
    )
)
_SETTLED_SQL = driver.sql_of(_SETTLED)
#: a payment that matched no order (``:p_*``), kept unmatched
_PARKED = (
    pg_insert(unmatched)
    .values(
        bound(
            unmatched,
            (*CONFIRMATION_FIELDS, "order_id", "failure_code", "failure_message"),
            "p_",
        )
    )
    .on_conflict_do_nothing()
)


def _closed(c: Confirmation, closing: Closing) -> Any:
    return (
        update(unmatched)
        .where(unmatched.c.transaction_id == c.transaction_id, unmatched.c.type == c.type)
        .values(state=closing.state, resolution=closing.resolution, resolved_at=closing.at)
    )


async def close_unmatched(conn: AsyncConnection, c: Confirmation, closing: Closing) -> None:
    """``c`` leaves the unmatched store (an operator resolved it)."""
    await conn.execute(_closed(c, closing))
