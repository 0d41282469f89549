"""``paysaga unmatched list|resolve`` — payments that matched no order.

A resolution runs in one transaction of the payments database: the decision (the same
pure ``decide_confirmation`` the service uses), the order state, the saga events and
the audit record are written together, and the relay publishes them. A refund for a
payment that belongs to no order calls the gateway with the same idempotency keys the
refunds service uses (``void:{txn}`` / ``refund:{txn}``), so it can never double up.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

import typer
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas.events import AuditRecorded
from services.payments import domain, store
from services.runtime.gateway_client import GatewayClient
from services.runtime.outbox import write_event
from services.runtime.service import make_engine
from services.runtime.settings import DatabaseSettings, GatewayClientSettings
from services.runtime.terminal import make_console
from services.runtime.topics import AUDIT_TOPIC, PAYMENTS_TOPIC

app = typer.Typer(no_args_is_help=True, help="Payments that matched no order")
console = make_console()


def _engine() -> AsyncEngine:
    return make_engine(DatabaseSettings().url_for("payments"), pool_size=1)


@app.command("list")
def list_(all_: bool = typer.Option(False, "--all", help="include resolved ones")) -> None:
    """Unmatched payments, oldest first."""

    async def run() -> list[Any]:
        engine = _engine()
        try:
            async with engine.connect() as conn:
                stmt = select(store.unmatched).order_by(store.unmatched.c.id)
                if not all_:
                    stmt = stmt.where(store.unmatched.c.state == "parked")
                return list(await conn.execute(stmt))
        finally:
            await engine.dispose()

    rows = asyncio.run(run())
    table = Table("id", "type", "transaction", "intent", "order", "amount", "received", "state")
    for r in rows:
        table.add_row(
            str(r.id),
            r.type,
            r.transaction_id,
            r.payment_intent_id,
            r.order_id or "-",
            f"{r.amount} {r.currency}",
            r.received_at.isoformat(),
            r.state if not r.resolution else f"{r.state} ({r.resolution})",
        )
    console.print(table)
    console.print(f"{len(rows)} unmatched payment(s)")


@app.command("resolve")
def resolve(
    unmatched_id: int = typer.Argument(..., help="id from `paysaga unmatched list`"),
    order: str | None = typer.Option(None, "--order", help="attach the payment to this order"),
    refund: bool = typer.Option(False, "--refund", help="give the money back (void or refund)"),
) -> None:
    """Attach an unmatched payment to an order, or return the money."""
    if (order is None) == (not refund):
        console.print("give exactly one of --order ORDER_ID or --refund")
        raise typer.Exit(2)
    try:
        message = asyncio.run(_resolve(unmatched_id, order, refund))
    except ResolutionError as exc:
        console.print(f"[red]not resolved[/red]: {exc}")
        raise typer.Exit(1) from exc
    console.print(message)


class ResolutionError(Exception):
    pass


async def _resolve(unmatched_id: int, order_id: str | None, refund: bool) -> str:
    engine = _engine()
    try:
        async with engine.begin() as conn:
            row = (
                await conn.execute(
                    select(store.unmatched)
                    .where(store.unmatched.c.id == unmatched_id)
                    .with_for_update()
                )
            ).first()
            if row is None or row.state != "parked":
                raise ResolutionError(f"no parked unmatched payment {unmatched_id}")
            c = store.confirmation_from_unmatched(row)
            now = datetime.now(UTC)
            if order_id is not None:
                return await _attach(conn, c, order_id, now)
            return await _give_back(conn, c, now)
    finally:
        await engine.dispose()


async def _attach(
    conn: AsyncConnection, c: domain.Confirmation, order_id: str, now: datetime
) -> str:
    row = await store.load_order(conn, order_id)
    if row is None:
        raise ResolutionError(f"order {order_id} is unknown to payments")
    # the operator vouches that this payment attempt belongs to the order: take its intent,
    # every other rule (amount, currency, awaiting payment) still applies
    order = dataclasses.replace(store.order_from_row(row), payment_intent_id=c.payment_intent_id)
    decision = domain.decide_confirmation(order, dataclasses.replace(c, order_id=order_id))
    if decision.order is None:
        raise ResolutionError(f"payment cannot settle order {order_id}: {decision.reason}")
    await store.store_confirmation(conn, c, decision.order, decision.outcome)
    await store.save_order(conn, decision.order)
    for event_type, payload in decision.events:
        await write_event(
            conn,
            PAYMENTS_TOPIC,
            event_type,
            payload,
            key=order_id,
            now=now,
            saga_seq=1,
            causation_id=c.gateway_event_id,
            correlation_id=order.correlation_id,
        )
    await store.close_unmatched(
        conn, c.transaction_id, c.type, "resolved_order", f"order {order_id}", now
    )
    await _audit(conn, c, "resolved_order", order_id, now)
    return f"payment {c.transaction_id} attached to order {order_id}: {decision.outcome}"


async def _give_back(conn: AsyncConnection, c: domain.Confirmation, now: datetime) -> str:
    if c.type == "payment.failed":
        note = "nothing was charged"
    else:
        s = GatewayClientSettings()
        async with GatewayClient(s.gateway_url, timeout_s=s.gateway_timeout_s) as gateway:
            if c.type == "payment.authorized":
                outcome = await gateway.void(
                    c.transaction_id, idempotency_key=f"void:{c.transaction_id}"
                )
            else:
                outcome = await gateway.refund(
                    c.transaction_id,
                    c.amount,
                    c.currency,
                    "unmatched_payment",
                    idempotency_key=f"refund:{c.transaction_id}",
                )
        if outcome.kind != "succeeded":
            # nothing is recorded: the operator can run the same command again (same key)
            raise ResolutionError(
                f"gateway answered {outcome.kind} ({outcome.code or outcome.reason})"
            )
        note = "voided" if c.type == "payment.authorized" else "refunded"
    await store.close_unmatched(conn, c.transaction_id, c.type, "resolved_refund", note, now)
    await _audit(conn, c, "resolved_refund", None, now)
    return f"payment {c.transaction_id}: {note}"


async def _audit(
    conn: AsyncConnection, c: domain.Confirmation, outcome: str, order_id: str | None, now: datetime
) -> None:
    audit = AuditRecorded(
        subject="unmatched_payment",
        action="operator_resolution",
        outcome=outcome,
        reason=None,
        order_id=order_id,
        transaction_id=c.transaction_id,
        gateway_event_id=c.gateway_event_id,
    )
    await write_event(
        conn,
        AUDIT_TOPIC,
        "AuditRecorded",
        audit,
        key=order_id or c.transaction_id,
        now=now,
        saga_seq=1,
        causation_id=c.gateway_event_id,
    )
