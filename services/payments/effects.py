"""What a payments decision emits, in the handler's transaction: its saga events on
payments.events.v1 (each validated as its ``schemas.events`` model) and its audit
entries on audit.events.v1. Audit entries never carry card data."""

from __future__ import annotations

import dataclasses
from typing import Any

from schemas.events import AuditRecorded
from services.payments.domain import Decision
from services.runtime.errors import validated_event
from services.runtime.messages import Context
from services.runtime.topics import AUDIT_TOPIC, PAYMENTS_TOPIC


async def emit_decision(
    ctx: Context, decision: Decision, *, subject: str, causation: str | None = None
) -> list[str]:
    """Emit the decision's saga events (roots of the attempt: saga_seq 1) and audit;
    returns the saga events' ids."""
    root = ctx.cause.as_root()
    cause = dataclasses.replace(root, event_id=causation) if causation else root
    emitted: list[str] = []
    for event_type, payload in decision.events:
        event = validated_event(event_type, payload)
        emitted.append(await ctx.emit(PAYMENTS_TOPIC, event, key=payload["order_id"], cause=cause))
    for entry in decision.audit:
        key = entry.get("order_id") or entry.get("transaction_id") or "unknown"
        await emit_audit(ctx, subject, entry, key)
    return emitted


async def emit_audit(ctx: Context, subject: str, entry: dict[str, Any], key: str) -> None:
    audit = AuditRecorded.model_validate({"subject": subject, **entry})
    await ctx.emit(AUDIT_TOPIC, audit, key=key, cause=ctx.cause.as_root())


def audit_entry(
    action: str, outcome: str, reason: str | None, order_id: str | None
) -> dict[str, Any]:
    return {
        "action": action,
        "outcome": outcome,
        "reason": reason,
        "order_id": order_id,
        "transaction_id": None,
        "gateway_event_id": None,
    }
