"""payments handlers (UC-35: store payment confirmation and record registration status).

Every handler runs inside the consumed record's transaction (services/runtime): the
order state, stored confirmation, emitted saga events, audit events and the consumer
position commit together. Nothing here calls Kafka or a clock directly.

A confirmation is checked in this order, each failure a rejection with a reason code
that is logged (security/validation), audited and counted — and never changes a status:
gateway known → signature (every configured secret of that gateway, every ``v1``) →
timestamp within tolerance of the *record* time (too old and too far in the future) →
well-formed body → no card data → not a duplicate → matching order / intent / amount /
currency. The raw bytes are verified before any JSON is parsed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas.carddata import find_card_data_in_bytes
from schemas.contract import GatewayWebhook, OrderPlaced, OrderStatusChanged, PaymentRetryRequested
from schemas.events import (
    AuditRecorded,
    OrderFlaggedForReconciliation,
    PaymentIntentCreated,
)
from services.payments import domain, request_store, store
from services.payments.domain import Confirmation, Decision, Item, Order
from services.runtime import signature
from services.runtime.errors import validated, validated_event
from services.runtime.messages import Context, Record
from services.runtime.outbox import Cause, write_event
from services.runtime.topics import AUDIT_TOPIC, CONFIRMATIONS_TOPIC, PAYMENTS_TOPIC
from services.runtime.topics import CHECKOUT_ORDERS_TOPIC as ORDERS_TOPIC

log = logging.getLogger("paysaga.payments")
security_log = logging.getLogger("paysaga.payments.security")


@dataclasses.dataclass(frozen=True)
class Metrics:
    confirmations: Counter
    orders: Counter
    retries: Counter
    unmatched_open: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            confirmations=Counter(
                "paysaga_confirmations_total",
                "Gateway confirmations by outcome (accepted, declined, parked, matched, "
                "duplicate, rejected) and reason",
                ["outcome", "reason"],
                registry=registry,
            ),
            orders=Counter(
                "paysaga_payments_orders_total",
                "OrderPlaced records by outcome (registered, duplicate, rejected)",
                ["outcome"],
                registry=registry,
            ),
            retries=Counter(
                "paysaga_payment_retries_total",
                "PaymentRetryRequested by outcome (retry_accepted, held, rejected) and reason",
                ["outcome", "reason"],
                registry=registry,
            ),
            unmatched_open=Gauge(
                "paysaga_unmatched_payments_open",
                "Gateway payments that matched no order and wait, by state (parked, "
                "refund_pending: an operator's void or refund whose answer was lost)",
                ["state"],
                registry=registry,
            ),
        )


@dataclasses.dataclass(frozen=True)
class PaymentsHandlers:
    secrets: dict[str, list[str]]
    tolerance_s: int
    unmatched_window: timedelta
    metrics: Metrics

    # ------------------------------------------------------------ checkout.orders.v1

    async def on_order_placed(self, ctx: Context) -> None:
        placed = validated(OrderPlaced, ctx.payload)
        incoming = Order(
            order_id=placed.order_id,
            customer_id=placed.customer_id,
            currency=placed.currency,
            total_amount=placed.total_amount,
            payment_intent_id=placed.payment_intent_id,
            payment_method=placed.payment_method,
            attempt=1,
            status="pending",
            items=tuple(Item(i.sku, i.quantity) for i in placed.items),
            correlation_id=(ctx.envelope or {}).get("correlation_id"),
            content_hash=store.content_hash(ctx.payload),
            conference_id=placed.conference_id,
        )
        row = await store.load_order(ctx.conn, placed.order_id)
        decision = domain.decide_order_placed(store.order_from_row(row) if row else None, incoming)
        self.metrics.orders.labels(decision.outcome).inc()
        if decision.outcome == "rejected":
            security_log.warning("order %s rejected: %s", placed.order_id, decision.reason)
        if decision.order is not None:
            await store.insert_order(ctx.conn, decision.order)
        emitted = await self._emit_decision(ctx, decision, subject="order")
        if decision.outcome == "registered" and decision.order is not None:
            await self._open_attempt(ctx, decision.order, emitted[0])

    async def _open_attempt(self, ctx: Context, order: Order, opened_by: str) -> None:
        """A registered order or accepted retry: match its parked payments, or — without
        a payment intent — record the request of its payment (docs/contract.md §3.7), caused by
        the OrderRegistered / PaymentRetryAccepted just emitted (``opened_by``), so the
        projection applies the request's events after it."""
        if order.payment_intent_id is not None:
            await self._match_parked(ctx, order)
            return
        correlation = (ctx.envelope or {}).get("correlation_id")
        cause = Cause(opened_by, 1, str(correlation) if correlation is not None else None)
        await request_store.record_request(ctx.conn, order, cause, ctx.now)

    async def _match_parked(self, ctx: Context, order: Order) -> None:
        assert order.payment_intent_id is not None
        await store.lock_intent(ctx.conn, order.payment_intent_id)  # see on_confirmation
        rows = await store.parked_for(ctx.conn, order)
        parked = [store.confirmation_from_unmatched(r) for r in rows]
        for c, decision in domain.decide_match_unmatched(
            order, parked, ctx.now, self.unmatched_window
        ):
            outcome = "matched" if decision.outcome in ("accepted", "declined") else "rejected"
            self.metrics.confirmations.labels(outcome, decision.reason or "none").inc()
            if decision.order is not None:
                await store.store_confirmation(ctx.conn, c, decision.order, decision.outcome)
                await store.save_order(ctx.conn, decision.order)
            await store.close_unmatched(
                ctx.conn,
                c.transaction_id,
                c.type,
                outcome,
                decision.reason or decision.outcome,
                ctx.now,
            )
            await self._emit_decision(
                ctx, decision, subject="unmatched_payment", causation=c.gateway_event_id
            )
        for r in await store.given_back_for(ctx.conn, order):
            # money an operator gives back (or gave back) is never this order's payment:
            # the order stays unpaid, and the audit trail says why
            reason = "refund_pending" if r.state == "refund_pending" else "refunded"
            log.warning(
                "order %s not matched to unmatched payment %s: %s by an operator",
                order.order_id,
                r.transaction_id,
                reason,
            )
            audit = _audit_entry("unmatched_matched", "not_matched", reason, order.order_id)
            audit |= {"transaction_id": r.transaction_id, "gateway_event_id": r.gateway_event_id}
            await self._emit_audit(ctx, "unmatched_payment", audit, order.order_id)

    async def on_intent_created(self, ctx: Context) -> None:
        """payments.events.v1 ``PaymentIntentCreated`` (our own, docs/contract.md §3.7): the
        attempt's requested payment is recorded. A confirmation of it that came first —
        the gateway created the payment, but its answer was lost or payments died before
        storing it, and the customer paid meanwhile — matched no order and was parked:
        match it now, as when an order arrives after its payment."""
        created = validated(PaymentIntentCreated, ctx.payload)
        await store.lock_intent(ctx.conn, created.payment_intent_id)  # see on_confirmation
        row = await store.load_order(ctx.conn, created.order_id)
        if row is None or (row.attempt, row.payment_intent_id) != (
            created.attempt,
            created.payment_intent_id,
        ):
            return  # an attempt that is over: its parked payments are an operator's
        await self._match_parked(ctx, store.order_from_row(row))

    async def on_retry_requested(self, ctx: Context) -> None:
        retry = validated(PaymentRetryRequested, ctx.payload)
        # the new intent's lock first, as a confirmation of it takes it before the order
        if retry.payment_intent_id is not None:
            await store.lock_intent(ctx.conn, retry.payment_intent_id)
        row = await store.load_order(ctx.conn, retry.order_id)
        order = store.order_from_row(row) if row else None
        decision = domain.decide_retry(
            order,
            retry.payment_intent_id,
            retry.payment_method,
            row.saga_status if row else None,
        )
        if decision.outcome == "held" and order is not None:
            # The attempt may still fail (a capture not yet declined, a status not yet
            # published): keep the request until orders.status.v1 says how the attempt
            # ended, so a customer who retries on seeing PAYMENT_FAILED is never refused
            # for our lag.
            await store.set_order_fields(
                ctx.conn,
                order.order_id,
                pending_retry={
                    "payment_intent_id": retry.payment_intent_id,
                    "payment_method": retry.payment_method,
                    "event_id": ctx.event_id,
                },
            )
            self.metrics.retries.labels("held", decision.reason).inc()
            await self._emit_decision(ctx, decision, subject="payment_retry")
            return
        await self._settle_retry(ctx, decision)

    async def _settle_retry(
        self, ctx: Context, decision: Decision, causation: str | None = None
    ) -> None:
        self.metrics.retries.labels(decision.outcome, decision.reason or "none").inc()
        if decision.outcome == "rejected":
            security_log.warning("payment retry rejected: %s", decision.reason)
        if decision.order is not None:
            # the new attempt has no published status yet
            await store.save_order(ctx.conn, decision.order, pending_retry=None, saga_status=None)
        emitted = await self._emit_decision(
            ctx, decision, subject="payment_retry", causation=causation
        )
        if decision.order is not None:
            await self._open_attempt(ctx, decision.order, emitted[0])

    # ------------------------------------------------------------ orders.status.v1

    async def on_status_changed(self, ctx: Context) -> None:
        """Mirror every published status of the current attempt: payments must know that
        a capture decline or an out-of-stock void failed the attempt, and that a failed
        attempt went on to NEEDS_RECONCILIATION, to accept a retry only when orders will."""
        status = validated(OrderStatusChanged, ctx.payload)
        row = await store.load_order(ctx.conn, status.order_id)
        if row is None or status.version <= row.saga_version:
            return
        await store.set_order_fields(ctx.conn, status.order_id, saga_version=status.version)
        order = store.order_from_row(row)
        if status.payment_intent_id != order.payment_intent_id:
            return  # about an earlier attempt
        saga_status = status.status.value
        await store.set_order_fields(ctx.conn, order.order_id, saga_status=saga_status)
        if saga_status == "PAYMENT_FAILED" and order.status in ("accepted", "flagged"):
            order = dataclasses.replace(order, status="failed")
            await store.save_order(ctx.conn, order)
        pending = row.pending_retry
        if pending is None:
            return
        decision = domain.decide_retry(
            order, pending["payment_intent_id"], pending["payment_method"], saga_status
        )
        if decision.outcome == "held":
            return
        await store.set_order_fields(ctx.conn, order.order_id, pending_retry=None)
        await self._settle_retry(ctx, decision, causation=pending["event_id"])

    # ------------------------------------------------------------ gateway.confirmations.v1

    async def on_confirmation(self, ctx: Context) -> None:
        rec = ctx.record
        checked = self._check(rec)
        if isinstance(checked, str):
            await self._reject(ctx, checked)
            return
        c, gateway_event_id = checked
        if not await store.mark_seen(ctx.conn, c.gateway, gateway_event_id) or (
            await store.transaction_known(ctx.conn, c.transaction_id, c.type)
        ):
            self.metrics.confirmations.labels("duplicate", "none").inc()
            return
        # Serializes parking with the registration of the intent's order (_match_parked),
        # which may run concurrently on another partition or instance: under READ
        # COMMITTED each could otherwise miss the other's uncommitted row.
        await store.lock_intent(ctx.conn, c.payment_intent_id)
        row = (
            await store.load_order(ctx.conn, c.order_id)
            if c.order_id
            else await store.load_order_by_intent(ctx.conn, c.payment_intent_id)
        )
        order = store.order_from_row(row) if row else None
        confirmed = order is None or order.status != "flagged"
        if order is not None and not confirmed:
            confirmed = await store.attempt_confirmed(ctx.conn, order.order_id, order.attempt)
        decision = domain.decide_confirmation(order, c, attempt_confirmed=confirmed)
        if decision.outcome == "parked":
            await store.park(ctx.conn, c)
            log.info(
                "unmatched payment parked: gateway event %s, transaction %s",
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
        elif decision.order is not None:
            await store.store_confirmation(ctx.conn, c, decision.order, decision.outcome)
            await store.save_order(ctx.conn, decision.order)
        self.metrics.confirmations.labels(decision.outcome, decision.reason or "none").inc()
        await self._emit_decision(
            ctx, decision, subject="gateway_confirmation", causation=gateway_event_id
        )

    def _check(self, rec: Record) -> tuple[Confirmation, str] | str:
        """The confirmation, or the reason it is rejected. Raw bytes are verified before
        anything parses them."""
        gateway = (rec.header("paysaga-gateway") or b"").decode("utf-8", "replace")
        secrets = self.secrets.get(gateway)
        if not secrets:
            return "unknown_gateway"
        header = rec.header("paysaga-signature")
        try:
            signature.verify(
                secrets,
                header.decode("ascii", "replace") if header else None,
                rec.value,
                reference_time=rec.timestamp_ms // 1000,
                tolerance_s=self.tolerance_s,
            )
        except signature.SignatureError as exc:
            return exc.reason
        try:
            raw = json.loads(rec.value)
        except (UnicodeDecodeError, json.JSONDecodeError):
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

    async def _reject(self, ctx: Context, reason: str) -> None:
        rec = ctx.record
        security_log.warning(
            "confirmation rejected: %s (topic %s partition %d offset %d)",
            reason,
            rec.topic,
            rec.partition,
            rec.offset,
        )
        self.metrics.confirmations.labels("rejected", reason).inc()
        key = rec.key_str or f"{rec.topic}/{rec.partition}/{rec.offset}"
        audit = _audit_entry("confirmation", "rejected", reason, None)
        # the key the bridge gave the record (unverified, so not claimed as the order id)
        audit["details"] = {
            "record": f"{rec.topic}/{rec.partition}/{rec.offset}",
            "record_key": rec.key_str,
        }
        await self._emit_audit(ctx, "gateway_confirmation", audit, key)

    # ------------------------------------------------------------ shared

    async def _emit_decision(
        self, ctx: Context, decision: Decision, *, subject: str, causation: str | None = None
    ) -> list[str]:
        """Emit the decision's saga events (roots of the attempt: saga_seq 1) and audit;
        returns the saga events' ids."""
        root = ctx.cause.as_root()
        cause = dataclasses.replace(root, event_id=causation) if causation else root
        emitted: list[str] = []
        for event_type, payload in decision.events:
            event = validated_event(event_type, payload)
            emitted.append(
                await ctx.emit(PAYMENTS_TOPIC, event, key=payload["order_id"], cause=cause)
            )
        for entry in decision.audit:
            key = entry.get("order_id") or entry.get("transaction_id") or "unknown"
            await self._emit_audit(ctx, subject, entry, key)
        return emitted

    async def _emit_audit(
        self, ctx: Context, subject: str, entry: dict[str, Any], key: str
    ) -> None:
        audit = AuditRecorded.model_validate({"subject": subject, **entry})
        await ctx.emit(AUDIT_TOPIC, audit, key=key, cause=ctx.cause.as_root())

    async def flag_dead_letter(
        self, conn: AsyncConnection, rec: Record, exc: BaseException
    ) -> None:
        """A confirmation or OrderPlaced record that could not be processed (e.g. the
        database stayed down past the retry budget): flag its order for reconciliation —
        never leave it looking merely pending — if the order is known. Runs in the
        dead-letter transaction. Other records (a malformed PaymentRetryRequested, a
        status change) change no money and flag nothing.

        The key is the bridge's (order id, else payment intent) for a confirmation and
        the order id for checkout.orders.v1, whose event type is read from the envelope."""
        key = rec.key_str
        if key is None or not _flags_its_order(rec):
            return
        row = await store.load_order(conn, key) or await store.load_order_by_intent(conn, key)
        if row is None:
            return
        order = dataclasses.replace(store.order_from_row(row), status="flagged")
        await store.save_order(conn, order)
        flagged = OrderFlaggedForReconciliation(
            order_id=order.order_id, attempt=order.attempt, reason="record_dead_lettered"
        )
        cause = Cause(f"{rec.topic}/{rec.partition}/{rec.offset}", None, order.correlation_id)
        await write_event(
            conn, PAYMENTS_TOPIC, flagged, key=order.order_id, now=datetime.now(UTC), cause=cause
        )
        log.error(
            "order %s flagged for reconciliation: %s dead-lettered (%s)",
            order.order_id,
            rec.topic,
            type(exc).__name__,
        )


def _flags_its_order(rec: Record) -> bool:
    if rec.topic == CONFIRMATIONS_TOPIC:
        return True
    if rec.topic != ORDERS_TOPIC:
        return False
    try:
        envelope = json.loads(rec.value)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(envelope, dict) and envelope.get("event_type") == "OrderPlaced"


def _audit_entry(
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
