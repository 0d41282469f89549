"""The unmatched payments (confirmations that matched no order yet, table
``unmatched_payments`` of ``store.py``): matching them when their order's attempt
opens, and the queries of the operator's ``paysaga unmatched`` commands.

A payment is kept unmatched by ``store.save_confirmation``; it waits in state
``parked`` until it is matched (``load_unmatched_of``) or an operator resolves it. An
operator's void or refund takes it out of matching first (``refund_pending``), before
any gateway call, and back (``cancel_refund``) if the gateway gave nothing back.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.payments.domain import Confirmation, Order
from services.payments.store import lock_intent, orders, unmatched
from services.runtime import driver


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


@dataclasses.dataclass(frozen=True, slots=True)
class UnmatchedOf:
    """The unmatched payments of an order's intent: those still matchable (state
    ``parked``, locked, oldest first) and those an operator is giving back or gave back
    (never this order's payment; locked too: one read under the intent's lock)."""

    matchable: list[Confirmation]
    given_back: list[Any]


#: an intent's unmatched payments that matter to an attempt of ``:order_id``: the parked
#: ones, and those given back naming no order or this one (a failed payment so resolved
#: took no money, so gave none back); locked, oldest first. Sent on the driver's
#: connection (every order with a payment intent reads them)
_UNMATCHED_OF_SQL = driver.sql_of(
    text(
        """
        SELECT * FROM unmatched_payments
        WHERE payment_intent_id = :intent
          AND (state = 'parked'
               OR (state IN ('refund_pending', 'resolved_refund')
                   AND type <> 'payment.failed'
                   AND (order_id IS NULL OR order_id = :order_id)))
        ORDER BY received_at, id
        FOR UPDATE
        """
    )
)


async def load_unmatched_of(conn: AsyncConnection, order: Order) -> UnmatchedOf:
    """What matching ``order``'s attempt needs, under its intent's lock (taken first, in
    a statement of its own: see ``store.load_for_confirmation``)."""
    assert order.payment_intent_id is not None
    await lock_intent(conn, order.payment_intent_id)
    rows = await driver.rows(
        conn, _UNMATCHED_OF_SQL, {"intent": order.payment_intent_id, "order_id": order.order_id}
    )
    matchable = [r for r in rows if r.state == "parked"]
    given_back = sorted((r for r in rows if r.state != "parked"), key=lambda r: r.id)
    return UnmatchedOf([confirmation_from_unmatched(r) for r in matchable], given_back)


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
    """The unmatched row, locked after its intent (the order ``load_unmatched_of``
    locks in); None if there is no such row."""
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
