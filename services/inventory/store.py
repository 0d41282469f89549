"""Inventory tables and queries. Every function runs in the caller's transaction.

The rule "reserved quantity never exceeds stock" is the CHECK constraint
``ck_stock_within_available`` (``reserved + sold <= available``): the conditional
UPDATEs below keep it, and the database refuses any write that would not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.inventory.domain import Line, ReservationState, StockLevel
from services.runtime import driver

metadata = MetaData()

stock = Table(
    "stock",
    metadata,
    Column("sku", String(64), primary_key=True),
    Column("available", BigInteger, nullable=False),
    Column("reserved", BigInteger, nullable=False, server_default="0"),
    Column("sold", BigInteger, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("available >= 0", name="ck_stock_available_non_negative"),
    CheckConstraint("reserved >= 0", name="ck_stock_reserved_non_negative"),
    CheckConstraint("sold >= 0", name="ck_stock_sold_non_negative"),
    CheckConstraint("reserved + sold <= available", name="ck_stock_within_available"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("order_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("transaction_id", Text, nullable=False),
    Column("state", String(16), nullable=False),
    #: merged lines in SKU order: [{"sku", "quantity"}]
    Column("lines", JSONB, nullable=False),
    Column("short_skus", JSONB, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("order_id", "attempt", name="pk_reservations"),
    CheckConstraint(
        "state IN ('reserved', 'failed', 'released', 'committed')", name="ck_reservations_state"
    ),
)


def _level(row: Any) -> StockLevel:
    return StockLevel(row.sku, row.available, row.reserved, row.sold)


def _lines(stored: Any) -> tuple[Line, ...]:
    return tuple(Line(str(i["sku"]), int(i["quantity"])) for i in stored)


async def set_available(
    conn: AsyncConnection, sku: str, available: int, now: datetime
) -> StockLevel | None:
    """Upsert a SKU's quota in one statement; None (nothing written) when the row holds
    more reserved + sold than ``available`` — the guard is in the statement itself, so
    a concurrent reservation cannot slip between a check and the write."""
    stmt = pg_insert(stock).values(sku=sku, available=available, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[stock.c.sku],
        set_={"available": stmt.excluded.available, "updated_at": stmt.excluded.updated_at},
        where=stock.c.reserved + stock.c.sold <= stmt.excluded.available,
    )
    row = (await conn.execute(stmt.returning(*stock.c))).first()
    return None if row is None else _level(row)


async def get_stock(conn: AsyncConnection, sku: str) -> StockLevel | None:
    row = (await conn.execute(select(stock).where(stock.c.sku == sku))).first()
    return None if row is None else _level(row)


async def list_stock(conn: AsyncConnection, sku: str | None = None) -> list[StockLevel]:
    query = select(stock).order_by(stock.c.sku)
    if sku is not None:
        query = query.where(stock.c.sku == sku)
    return [_level(row) for row in await conn.execute(query)]


#: ``claim_reservation``: the order's reservations locked (as they were before this
#: statement) and this attempt's reservation claimed, in one statement
_CLAIM = text(
    "WITH held AS (SELECT attempt, state, lines FROM reservations WHERE order_id = :order_id"
    " ORDER BY attempt FOR UPDATE),"
    " claimed AS (INSERT INTO reservations"
    " (order_id, attempt, transaction_id, state, lines, created_at, updated_at)"
    " VALUES (:order_id, :attempt, :transaction_id, 'reserved', CAST(:lines AS jsonb), :now, :now)"
    " ON CONFLICT DO NOTHING RETURNING 1)"
    " SELECT held.attempt, held.state, held.lines, EXISTS (SELECT FROM claimed) AS claimed"
    " FROM (SELECT) AS one LEFT JOIN held ON true ORDER BY held.attempt"
)
_CLAIM_SQL = driver.sql_of(_CLAIM)


async def claim_reservation(
    conn: AsyncConnection,
    order_id: str,
    attempt: int,
    transaction_id: str,
    lines: Sequence[Line],
    now: datetime,
) -> tuple[dict[int, tuple[ReservationState, tuple[Line, ...]]], bool]:
    """Every reservation the order had (attempt -> state, lines), the rows locked until
    the transaction ends like ``lock_reservation``'s; and whether (order_id, attempt)'s
    reservation was claimed now — False if that attempt was handled before (or is being
    handled concurrently: the claim waits for it), then nothing changes. One statement;
    the lines are held next (``hold_claimed``)."""
    params = {
        "order_id": order_id,
        "attempt": attempt,
        "transaction_id": transaction_id,
        "lines": json.dumps([{"sku": ln.sku, "quantity": ln.quantity} for ln in lines]),
        "now": now,
    }
    rows = await driver.rows(conn, _CLAIM_SQL, params)
    held = {
        r.attempt: (cast(ReservationState, r.state), _lines(r.lines))
        for r in rows
        if r.attempt is not None
    }
    return held, bool(rows[0].claimed)


async def hold_claimed(
    conn: AsyncConnection, order_id: str, attempt: int, lines: Sequence[Line], now: datetime
) -> list[str]:
    """Reserve every line of the claimed (order_id, attempt), or none: the short SKUs
    (empty: all reserved).

    The reservation row was claimed first (``claim_reservation``: ``ON CONFLICT DO
    NOTHING``), so a duplicate — even one running concurrently — changes nothing. Each
    line is one conditional ``UPDATE … WHERE available - reserved - sold >= q`` (never
    read-then-write), in the caller's SKU order; those of several lines run in a
    savepoint that is rolled back if any line is short (one line needs none: its update
    holds it or nothing). A SKU that was never stocked has no row and is therefore short.
    Every line is tried, so ``short_skus`` names all of them, not just the first.
    """
    short: list[str] = []
    if len(lines) == 1:  # one conditional update: it holds the line, or nothing
        short = await _hold(conn, lines, now)
    else:
        async with conn.begin_nested() as savepoint:
            short = await _hold(conn, lines, now)
            if short:
                await savepoint.rollback()  # also releases the row locks taken after it
    if short:
        await conn.execute(
            update(reservations)
            .where(reservations.c.order_id == order_id, reservations.c.attempt == attempt)
            .values(state="failed", short_skus=short, updated_at=now)
        )
    return short


#: ``_hold``: one line held if it fits — never read-then-write
_HOLD_LINE_SQL = driver.sql_of(
    text(
        "UPDATE stock SET reserved = reserved + :quantity, updated_at = :now"
        " WHERE sku = :sku AND available - reserved - sold >= :quantity RETURNING sku"
    )
)


async def _hold(conn: AsyncConnection, lines: Sequence[Line], now: datetime) -> list[str]:
    """Reserve each line that fits, in the caller's order; the SKUs that did not."""
    short: list[str] = []
    for line in lines:
        params = {"sku": line.sku, "quantity": line.quantity, "now": now}
        if not await driver.rows(conn, _HOLD_LINE_SQL, params):
            short.append(line.sku)
    return short


async def lock_reservation(
    conn: AsyncConnection, order_id: str, attempt: int
) -> tuple[ReservationState, tuple[Line, ...]] | None:
    """The reservation's state and lines, its row locked until the transaction ends so
    that two settlements of one reservation run one after the other."""
    row = (
        await conn.execute(
            select(reservations.c.state, reservations.c.lines)
            .where(reservations.c.order_id == order_id, reservations.c.attempt == attempt)
            .with_for_update()
        )
    ).first()
    if row is None:
        return None
    return cast(ReservationState, row.state), _lines(row.lines)


async def lock_stock(conn: AsyncConnection, skus: Sequence[str]) -> None:
    """Lock the stock rows of ``skus`` in SKU order: a transaction that releases one
    reservation and takes another then keeps the single lock order of ``merge_lines``."""
    await conn.execute(
        select(stock.c.sku)
        .where(stock.c.sku.in_(sorted(set(skus))))
        .order_by(stock.c.sku)
        .with_for_update()
    )


#: ``settle_held``: a held reservation settled and, if it has one line, that line's stock
#: row, in one statement; a reservation not held (``state`` other than ``reserved``)
#: returns no row and changes nothing
_SETTLE_HELD = text(
    "WITH settled AS (UPDATE reservations SET state = :target, updated_at = :now"
    " WHERE order_id = :order_id AND attempt = :attempt AND state = 'reserved'"
    " RETURNING lines),"
    " line AS (SELECT l->>'sku' AS sku, CAST(l->>'quantity' AS bigint) AS quantity"
    " FROM settled, jsonb_array_elements(settled.lines) AS l"
    " WHERE jsonb_array_length(settled.lines) = 1),"
    " held AS (UPDATE stock SET reserved = stock.reserved - line.quantity,"
    " sold = stock.sold + CASE WHEN :sold THEN line.quantity ELSE 0 END, updated_at = :now"
    " FROM line WHERE stock.sku = line.sku RETURNING stock.sku)"
    " SELECT settled.lines, (SELECT count(*) FROM held) AS held FROM settled"
)
_SETTLE_HELD_SQL = driver.sql_of(_SETTLE_HELD)


async def settle_held(
    conn: AsyncConnection,
    order_id: str,
    attempt: int,
    target: ReservationState,
    now: datetime,
) -> tuple[Line, ...] | None:
    """``settle`` for a reservation only if it is held, without reading it first: its
    lines, settled; None — nothing written — if it is not held (then its state decides,
    ``lock_reservation``). One statement for a reservation of one line, its row locked
    before its stock row as ``settle`` locks them; a larger one's lines follow one by one,
    in SKU order."""
    params = {
        "order_id": order_id,
        "attempt": attempt,
        "target": target,
        "now": now,
        "sold": target == "committed",
    }
    found = await driver.rows(conn, _SETTLE_HELD_SQL, params)
    if not found:
        return None
    row = found[0]
    lines = _lines(row.lines)
    if len(lines) == 1:
        if row.held != 1:
            raise RuntimeError(f"stock row {lines[0].sku!r} of a held reservation is missing")
        return lines
    for line in lines:
        await _settle_line(conn, line, target, now, None)
    return lines


async def settle(
    conn: AsyncConnection,
    order_id: str,
    attempt: int,
    lines: Sequence[Line],
    target: ReservationState,
    now: datetime,
) -> None:
    """Move a locked, held reservation to ``committed`` (reserved → sold) or ``released``
    (reserved → sellable again), line by line in SKU order — the reservation's own row
    in the statement of its first line."""
    settled = (
        update(reservations)
        .where(reservations.c.order_id == order_id, reservations.c.attempt == attempt)
        .values(state=target, updated_at=now)
    )
    if not lines:
        await conn.execute(settled)
        return
    for i, line in enumerate(lines):
        await _settle_line(conn, line, target, now, settled if i == 0 else None)


async def _settle_line(
    conn: AsyncConnection, line: Line, target: ReservationState, now: datetime, reservation: Any
) -> None:
    """One line's stock row settled (and ``reservation``, the reservation's own update, in the
    same statement)."""
    values: dict[str, Any] = {"reserved": stock.c.reserved - line.quantity, "updated_at": now}
    if target == "committed":
        values["sold"] = stock.c.sold + line.quantity
    stmt = update(stock).where(stock.c.sku == line.sku).values(**values)
    if reservation is not None:
        stmt = stmt.add_cte(reservation.cte("settled"))
    done = await conn.execute(stmt.returning(stock.c.sku))
    if done.first() is None:
        raise RuntimeError(f"stock row {line.sku!r} of a held reservation is missing")
