"""The payment requests' intents (docs/contract.md §3.7): recorded by the OrderPlaced / retry
handler (transaction A), resolved by the request worker (transaction B, which also
tells the order its payment intent and writes PaymentRequested — the only event with
the client secret). Their table is ``store.payment_requests``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.contract import PaymentRequested
from schemas.events import PaymentRequestContext
from services.payments import requests
from services.payments.domain import Order
from services.payments.store import orders, payment_requests
from services.runtime.intents.store import Claimed, IntentStore, unsettled_values
from services.runtime.outbox import Cause, write_event
from services.runtime.topics import PAYMENT_REQUESTS_TOPIC
from services.runtime.wakeup import notify

#: the NOTIFY channel the payment request worker listens on
REQUEST_CHANNEL = "paysaga_payment_requests"


def _request_claim(row: Any) -> requests.Claim:
    return requests.Claim(
        order_id=row.order_id,
        attempt=row.attempt,
        amount=row.amount,
        currency=row.currency,
        payment_method=row.payment_method,
        round=row.attempts,
    )


def _request_values(resolution: requests.Resolution) -> dict[str, Any]:
    match resolution:
        case requests.Requested(payment_intent_id=intent, expires_at=expires_at):
            return {"state": "requested", "payment_intent_id": intent, "expires_at": expires_at}
        case requests.Refused(code=code):
            return {"state": "refused", "outcome_reason": code[:64]}
        case requests.Failed(reason=reason):
            return {"state": "failed", "outcome_reason": reason}
        case requests.Retry():
            return unsettled_values(resolution)


async def _request_resolved(
    conn: AsyncConnection, claimed: Claimed[Any], resolution: Any, now: datetime
) -> None:
    """Transaction B's part in the orders table: the attempt learns its payment intent
    (confirmations match it from now on) and the checkout gets PaymentRequested — the
    only event with the client secret; or the attempt fails (a refusal: retryable) or
    is flagged (automatic handling exhausted)."""
    claim: requests.Claim = claimed.claim
    attempt = (orders.c.order_id == claim.order_id) & (orders.c.attempt == claim.attempt)
    match resolution:
        case requests.Requested(payment_intent_id=intent):
            await conn.execute(
                update(orders)
                .where(attempt, orders.c.payment_intent_id.is_(None))
                .values(payment_intent_id=intent, updated_at=func.now())
            )
            requested = PaymentRequested(
                order_id=claim.order_id,
                payment_intent_id=intent,
                amount=claim.amount,
                currency=claim.currency,
                payment_method=claim.payment_method,
                client_secret=resolution.client_secret,
                expires_at=resolution.expires_at,
            )
            await write_event(
                conn,
                PAYMENT_REQUESTS_TOPIC,
                requested,
                key=claim.order_id,
                now=now,
                cause=claimed.cause,
            )
        case requests.Refused() | requests.Failed():
            status = "failed" if isinstance(resolution, requests.Refused) else "flagged"
            await conn.execute(
                update(orders)
                .where(attempt, orders.c.status == "pending")
                .values(status=status, updated_at=func.now())
            )


REQUESTS: IntentStore[requests.Claim, requests.Resolution] = IntentStore(
    payment_requests,
    ("order_id", "attempt"),
    _request_claim,
    _request_values,
    context_model=PaymentRequestContext,
    on_resolved=_request_resolved,
)


async def record_request(conn: AsyncConnection, order: Order, cause: Cause, now: datetime) -> bool:
    """Transaction A (the OrderPlaced / retry handler's): the attempt's payment request,
    due at once; False if the attempt has one already."""
    context = PaymentRequestContext(
        order_id=order.order_id,
        attempt=order.attempt,
        amount=order.total_amount,
        currency=order.currency,
        payment_method=order.payment_method,
    )
    recorded = await REQUESTS.record(
        conn,
        context,
        cause,
        now,
        idempotency_key=requests.request_key(order.order_id, order.attempt),
        state="pending",
        next_attempt_at=now,
        payment_method=order.payment_method,
    )
    if recorded:
        await notify(conn, REQUEST_CHANNEL)
    return recorded
