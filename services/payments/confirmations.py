"""gateway.confirmations.v1: the gateway's webhooks, raw (docs/contract.md §2.2: store
the payment confirmation).

A confirmation is checked in this order, each failure a rejection with a reason code
that is logged (security/validation), audited and counted — and never changes a status:
gateway known → signature (every configured secret of that gateway, every ``v1``) →
timestamp within tolerance of the *record* time (too old and too far in the future) →
well-formed body → no card data → not a duplicate → matching order / intent / amount /
currency. The raw bytes are verified before any JSON is parsed.

Then, in the record's transaction: one call loads what the decision needs
(``confirmation_store.load_for_confirmation``), ``domain.decide_confirmation`` decides,
one statement saves the result (``confirmation_store.save_confirmation``), and the
decision's events and audit go to the outbox (``effects.emit_decision``).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from pydantic import ValidationError

from schemas.carddata import find_card_data_in_bytes
from schemas.contract import GatewayWebhook
from schemas.events import AuditRecorded
from services.payments import confirmation_store, domain
from services.payments.domain import Confirmation
from services.payments.effects import emit_audit, emit_decision
from services.payments.metrics import Metrics
from services.runtime import signature
from services.runtime.messages import Context, Record

log = logging.getLogger("paysaga.payments")
security_log = logging.getLogger("paysaga.payments.security")


def check(
    rec: Record, secrets: dict[str, list[str]], tolerance_s: int
) -> tuple[Confirmation, str] | str:
    """The confirmation and its gateway event id, or the reason it is rejected. Raw
    bytes are verified before anything parses them."""
    gateway = (rec.header("paysaga-gateway") or b"").decode("utf-8", "replace")
    gateway_secrets = secrets.get(gateway)
    if not gateway_secrets:
        return "unknown_gateway"
    header = rec.header("paysaga-signature")
    try:
        signature.verify(
            gateway_secrets,
            header.decode("ascii", "replace") if header else None,
            rec.value,
            reference_time=rec.timestamp_ms // 1000,
            tolerance_s=tolerance_s,
        )
    except signature.SignatureError as exc:
        return exc.reason
    try:
        raw = json.loads(rec.value)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting
        return "invalid_body"
    # every key/value pair of the raw bytes: json.loads kept only the last of a
    # repeated key, behind which card data could hide
    card = find_card_data_in_bytes(rec.value)
    if card is not None:
        return card
    try:
        hook = GatewayWebhook.model_validate(raw)
    except ValidationError:
        return "invalid_body"
    d = hook.data
    confirmation = Confirmation(
        gateway=gateway,
        gateway_event_id=hook.id,
        type=hook.type.value,
        transaction_id=d.transaction_id,
        payment_intent_id=d.payment_intent_id,
        order_id=d.order_id,
        amount=d.amount,
        currency=d.currency,
        payment_method_type=d.payment_method.type,
        brand=d.payment_method.brand,
        last4=d.payment_method.last4,
        failure_code=d.failure_code,
        failure_message=d.failure_message,
        record_time=datetime.fromtimestamp(rec.timestamp_ms / 1000, UTC),
    )
    return confirmation, hook.id


async def on_confirmation(
    ctx: Context, checked: tuple[Confirmation, str] | str, metrics: Metrics
) -> None:
    """Handle a confirmation ``check``ed already."""
    if isinstance(checked, str):
        await _reject(ctx, checked, metrics)
        return
    c, gateway_event_id = checked
    state = await confirmation_store.load_for_confirmation(ctx.conn, c)
    if state is None:
        metrics.confirmations.labels("duplicate", "none").inc()
        return
    decision = domain.decide_confirmation(state.order, c, attempt_confirmed=state.attempt_confirmed)
    await confirmation_store.save_confirmation(ctx.conn, c, decision)
    if decision.outcome == "parked":
        log.info(
            "unmatched payment kept: gateway event %s, transaction %s",
            c.gateway_event_id,
            c.transaction_id,
        )
    elif decision.outcome == "rejected":
        security_log.warning(
            "confirmation rejected: %s (gateway %s, event %s, transaction %s)",
            decision.reason,
            c.gateway,
            c.gateway_event_id,
            c.transaction_id,
        )
    metrics.confirmations.labels(decision.outcome, decision.reason or "none").inc()
    await emit_decision(ctx, decision, causation=gateway_event_id)


async def _reject(ctx: Context, reason: str, metrics: Metrics) -> None:
    rec = ctx.record
    security_log.warning(
        "confirmation rejected: %s (topic %s partition %d offset %d)",
        reason,
        rec.topic,
        rec.partition,
        rec.offset,
    )
    metrics.confirmations.labels("rejected", reason).inc()
    key = rec.key_str or f"{rec.topic}/{rec.partition}/{rec.offset}"
    audit = AuditRecorded(
        subject="gateway_confirmation",
        action="confirmation",
        outcome="rejected",
        reason=reason,
        # the key the bridge gave the record (unverified, so not claimed as the order id)
        details={"record": f"{rec.topic}/{rec.partition}/{rec.offset}", "record_key": rec.key_str},
    )
    await emit_audit(ctx, audit, key)
