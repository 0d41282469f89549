"""What a payments decision emits, in the handler's transaction: its saga events on
payments.events.v1 and its audit entries on audit.events.v1, each the ``schemas.events``
model the decision holds. Audit entries never carry card data."""

from __future__ import annotations

import dataclasses

from schemas.events import AuditRecorded
from services.payments.domain import Decision
from services.runtime.messages import Context
from services.runtime.topics import AUDIT_TOPIC, PAYMENTS_TOPIC


async def emit_decision(
    ctx: Context, decision: Decision, *, causation: str | None = None
) -> list[str]:
    """Emit the decision's saga events (roots of the attempt: saga_seq 1) and audit;
    returns the saga events' ids."""
    root = ctx.cause.as_root()
    cause = dataclasses.replace(root, event_id=causation) if causation else root
    emitted: list[str] = []
    for event in decision.events:
        emitted.append(await ctx.emit(PAYMENTS_TOPIC, event, key=event.order_id, cause=cause))
    for audit in decision.audit:
        await emit_audit(ctx, audit, audit.order_id or audit.transaction_id or "unknown")
    return emitted


async def emit_audit(ctx: Context, audit: AuditRecorded, key: str) -> None:
    await ctx.emit(AUDIT_TOPIC, audit, key=key, cause=ctx.cause.as_root())
