"""``paysaga unmatched list|resolve`` — payments that matched no order.

Attaching a payment to an order runs in one transaction of the payments database: the
decision (the same pure ``decide_confirmation`` the service uses), the order state, the
saga events and the audit record are written together, and the relay publishes them.

Giving the money back follows the rule of every gateway call in paysaga: transaction A
records the intent — state ``refund_pending`` with its one idempotency key, the refunds
service's (``void:{txn}`` / ``refund:{txn}``) — which takes the payment out of automatic
matching; then, no transaction open, the gateway is asked (a look-up first, so money
already given back is never sent twice) and called; transaction B settles the row
(``resolved_refund``, audited). An unknown outcome (a timeout, the process killed)
leaves the row ``refund_pending``: running the command again settles it.
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
from services.payments import confirmation_store, domain, store, unmatched_store
from services.refunds.domain import Action, compensation_key
from services.runtime.errors import describe
from services.runtime.gateway_client import GatewayClient, GatewayError, GatewayNotFoundError
from services.runtime.outbox import Cause, write_event
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
                    stmt = stmt.where(store.unmatched.c.state.in_(unmatched_store.UNMATCHED_OPEN))
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
    pending = sum(r.state == "refund_pending" for r in rows)
    if pending:
        console.print(
            f"{pending} refund(s) pending (the gateway may have done them):"
            " `paysaga unmatched resolve ID --refund` settles each"
        )


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
        message = asyncio.run(resolve_unmatched(unmatched_id, order))
    except ResolutionError as exc:
        console.print(f"[red]not resolved[/red]: {exc}")
        raise typer.Exit(1) from exc
    console.print(message)


class ResolutionError(Exception):
    pass


async def resolve_unmatched(unmatched_id: int, order_id: str | None) -> str:
    """Attach unmatched payment ``unmatched_id`` to ``order_id``, or (None) give its money
    back; the message of what was done. Raises ResolutionError. The one code path of
    ``paysaga unmatched resolve`` and of the operator console."""
    engine = _engine()
    try:
        if order_id is None:
            return await _give_back(engine, unmatched_id)
        async with engine.begin() as conn:
            row = await _locked(conn, unmatched_id, "parked")
            c = unmatched_store.confirmation_from_unmatched(row)
            return await _attach(conn, c, order_id, datetime.now(UTC))
    finally:
        await engine.dispose()


async def _locked(conn: AsyncConnection, unmatched_id: int, *states: str) -> Any:
    row = await unmatched_store.lock_unmatched(conn, unmatched_id)
    if row is not None and row.state == "refund_pending" and row.state not in states:
        action = _action(unmatched_store.confirmation_from_unmatched(row))
        raise ResolutionError(
            f"payment {row.transaction_id} cannot be attached: its {action} is pending (key"
            f" {row.refund_key}); `paysaga unmatched resolve {unmatched_id} --refund` settles it"
        )
    if row is None or row.state not in states:
        raise ResolutionError(f"no parked unmatched payment {unmatched_id}")
    return row


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
    closing = confirmation_store.Closing("resolved_order", f"order {order_id}", now)
    await confirmation_store.save_confirmation(conn, c, decision, closing)
    cause = Cause(c.gateway_event_id, None, order.correlation_id)
    for event in decision.events:
        await write_event(conn, PAYMENTS_TOPIC, event, key=order_id, now=now, cause=cause)
    await _audit(conn, c, "resolved_order", order_id, now)
    return f"payment {c.transaction_id} attached to order {order_id}: {decision.outcome}"


async def _give_back(engine: AsyncEngine, unmatched_id: int) -> str:
    async with engine.begin() as conn:  # transaction A: out of matching before any call
        row = await _locked(conn, unmatched_id, "parked", "refund_pending")
        c = unmatched_store.confirmation_from_unmatched(row)
        if c.type == "payment.failed":
            return await _settle(conn, c, "nothing was charged")
        key = row.refund_key or compensation_key(_action(c), c.transaction_id)
        await unmatched_store.request_refund(conn, unmatched_id, key, datetime.now(UTC))
    outcome = await _ask_gateway(c, key)  # no transaction open
    async with engine.begin() as conn:  # transaction B
        row = await unmatched_store.lock_unmatched(conn, unmatched_id)
        if row.state != "refund_pending":  # a concurrent run of the command settled it
            return f"payment {c.transaction_id}: {row.state} ({row.resolution})"
        if isinstance(outcome, Refused):
            await unmatched_store.cancel_refund(conn, unmatched_id, outcome.note)
            waiting = await unmatched_store.awaiting_order_of(conn, c)
        else:
            return await _settle(conn, c, outcome)
    # an order that arrived meanwhile was not matched, and will not arrive again
    arrived = (
        f"; order {waiting} arrived while it was pending and awaits payment:"
        f" `paysaga unmatched resolve {unmatched_id} --order {waiting}` attaches it"
        if waiting
        else ""
    )
    raise ResolutionError(f"{outcome.note}: the payment is parked again{arrived}")


@dataclasses.dataclass(frozen=True)
class Refused:
    """The gateway certainly gave nothing back (declined, unknown transaction)."""

    note: str


def _action(c: domain.Confirmation) -> Action:
    return "void" if c.type == "payment.authorized" else "refund"


async def _ask_gateway(c: domain.Confirmation, key: str) -> str | Refused:
    """The note of money given back, or Refused. A doubt (a timeout, the gateway away, an
    answer outside the contract) raises ResolutionError and the refund stays pending."""
    unknown = "; the payment stays out of matching: run the same command again to settle it"
    s = GatewayClientSettings()
    async with GatewayClient(
        s.gateway_url, timeout_s=s.gateway_timeout_s, max_attempts=s.gateway_max_attempts
    ) as gateway:
        try:
            # the gateway's own record first: a call of an earlier run may have been applied
            done = _given_back(c, await gateway.get_payment(c.transaction_id))
            if done is not None:
                return done
            if _action(c) == "void":
                outcome = await gateway.void(c.transaction_id, idempotency_key=key)
            else:
                outcome = await gateway.refund(
                    c.transaction_id, c.amount, c.currency, "unmatched_payment", key
                )
        except GatewayNotFoundError:
            return Refused(f"the gateway does not know transaction {c.transaction_id}")
        except GatewayError as exc:
            raise ResolutionError(f"gateway: {describe(exc)}{unknown}") from exc
    if outcome.kind == "succeeded":
        return "voided" if _action(c) == "void" else _refunded(outcome.body)
    if outcome.kind in ("declined", "not_found"):
        return Refused(f"gateway answered {outcome.kind} ({outcome.code or outcome.reason})")
    raise ResolutionError(f"gateway answered {outcome.kind} ({outcome.reason}){unknown}")


def _given_back(c: domain.Confirmation, payment: dict[str, Any]) -> str | None:
    """The note of what the gateway already gave back of ``c``; None if it gave nothing
    back and can be asked to. Anything else is for an operator (ResolutionError)."""
    state = payment.get("state")
    if _action(c) == "void":
        if payment.get("voids") or state == "voided":
            return "voided"
        if state == "authorized":
            return None
    else:
        refunds = [r for r in payment.get("refunds") or [] if isinstance(r, dict)]
        if not refunds and state == "captured":
            return None
        in_currency = all(r.get("currency") == c.currency for r in refunds)
        if refunds and in_currency and sum(int(r.get("amount") or 0) for r in refunds) == c.amount:
            return _refunded(refunds[-1])
    raise ResolutionError(
        f"the gateway shows transaction {c.transaction_id} {state} (refunds"
        f" {payment.get('refunds')!r}), not what a {_action(c)} of {c.amount} {c.currency}"
        f" expects: settle it at the gateway; the {_action(c)} stays pending"
    )


def _refunded(refund: dict[str, Any]) -> str:
    refund_id = refund.get("refund_id")
    return f"refunded ({refund_id})" if refund_id else "refunded"


async def _settle(conn: AsyncConnection, c: domain.Confirmation, note: str) -> str:
    now = datetime.now(UTC)
    closing = confirmation_store.Closing("resolved_refund", note, now)
    await confirmation_store.close_unmatched(conn, c, closing)
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
    key = order_id or c.transaction_id
    await write_event(conn, AUDIT_TOPIC, audit, key=key, now=now, cause=Cause(c.gateway_event_id))
