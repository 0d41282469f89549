"""The orders service's handlers: the status projection and the audit store.

Each handler runs inside the runtime's transaction for the consumed record, after the
runtime's inbox accepted its event id (a redelivered event never reaches a handler).
Everything a handler does — the view, the applied-event set, early events, history,
audit rows and the ``orders.status.v1`` / ``customer.notifications.v1`` outbox rows —
commits together with the consumer position, or not at all.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas import events
from schemas.contract import CustomerNotificationRequested, OrderStatusChanged
from schemas.envelope import Envelope
from schemas.events import AuditRecorded
from services.orders import store
from services.orders.domain import OrderView, decide, is_ready, release_order
from services.runtime.errors import PermanentError, validated, validated_event
from services.runtime.messages import Context, Handler, Handlers, Record
from services.runtime.outbox import Cause
from services.runtime.topics import AUDIT_TOPIC, NOTIFICATIONS_TOPIC, STATUS_TOPIC

log = logging.getLogger("paysaga.orders")


#: Every saga event the projection consumes (docs/saga-events.md), by topic.
SAGA_EVENTS: Mapping[str, tuple[type[BaseModel], ...]] = {
    "payments.events.v1": (
        events.OrderRegistered,
        events.PaymentRetryAccepted,
        events.PaymentAccepted,
        events.PaymentDeclined,
        events.OrderFlaggedForReconciliation,
        events.PaymentIntentCreated,
        events.PaymentRequestRefused,
        events.PaymentRequestFailed,
    ),
    "inventory.events.v1": (
        events.StockReserved,
        events.StockReservationFailed,
        events.StockReleased,
        events.StockCommitted,
    ),
    "capture.events.v1": (
        events.PaymentCaptured,
        events.SaleConfirmed,
        events.CaptureDeclined,
        events.AuthorizationExpired,
        events.CaptureFailed,
    ),
    "refunds.events.v1": (
        events.AuthorizationVoided,
        events.RefundSucceeded,
        events.CompensationFailed,
    ),
}


@dataclasses.dataclass(frozen=True)
class OrdersMetrics:
    status_changes: Counter
    ignored: Counter
    early_events: Gauge
    reconcile_violations: Gauge
    reconcile_runs: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> OrdersMetrics:
        return cls(
            status_changes=Counter(
                "paysaga_order_status_changes_total",
                "Status changes emitted on orders.status.v1, by new status",
                ["status"],
                registry=registry,
            ),
            ignored=Counter(
                "paysaga_orders_ignored_events_total",
                "Saga events applied without a status change they asked for, by reason "
                "(stale_attempt, transition_not_allowed, unknown_order, ...)",
                ["reason"],
                registry=registry,
            ),
            early_events=Gauge(
                "paysaga_orders_held_events",
                "Saga events waiting for their cause (held_events rows, all orders)",
                registry=registry,
            ),
            reconcile_violations=Gauge(
                "paysaga_reconcile_violations",
                "Violations found by the last periodic reconcile, by rule",
                ["kind"],
                registry=registry,
            ),
            reconcile_runs=Counter(
                "paysaga_reconcile_runs_total",
                "Periodic reconcile runs by outcome (ok, failed)",
                ["outcome"],
                registry=registry,
            ),
        )


@dataclasses.dataclass(frozen=True)
class SagaEvent:
    """A validated saga event: envelope fields the gate needs plus the payload."""

    event_id: str
    event_type: str
    saga_seq: int | None
    causation_id: str | None
    correlation_id: str | None
    payload: dict[str, Any]
    envelope: dict[str, Any]

    @property
    def order_id(self) -> str:
        return str(self.payload["order_id"])

    @property
    def cause(self) -> Cause:
        """This event as the cause of what applying it emits — named explicitly: a
        released early event is not the consumed record ``Context.emit`` defaults to."""
        return Cause(self.event_id, self.saga_seq, self.correlation_id)

    @classmethod
    def parse(cls, envelope: dict[str, Any]) -> SagaEvent:
        """Raises PermanentError for a malformed envelope or payload."""
        env = validated(Envelope, envelope)
        if env.saga_seq is not None and env.saga_seq > 1 and not env.causation_id:
            # its cause could never be found: it would be held forever
            raise PermanentError("schema_violation", "saga_seq > 1 without causation_id")
        payload = validated_event(env.event_type, env.payload)
        return cls(
            event_id=env.event_id,
            event_type=env.event_type,
            saga_seq=env.saga_seq,
            causation_id=env.causation_id,
            correlation_id=env.correlation_id,
            payload=payload.model_dump(mode="json"),
            # the validated envelope: an unknown field (a stray `cvv`) is never stored
            envelope=env.model_dump(mode="json"),
        )


class Projection:
    """The status projection (docs/contract.md §3.1, §3.3) with its causal gate.

    Guarantees, per order: events are applied in causal order (an event with
    ``saga_seq > 1`` only after the event named by its ``causation_id``; an *early
    event*, one that came before its cause, is kept (table ``held_events``) and
    released in the same transaction as its cause); each event is applied
    at most once (runtime inbox + ``applied_events``); ``version`` on orders.status.v1
    grows by exactly one per change; each notification is requested at most once per
    (attempt, kind) — all decided by the pure ``domain.decide``.

    Metrics are counted when handled: a batch that rolls back and is retried counts
    again.
    """

    def __init__(self, metrics: OrdersMetrics) -> None:
        self.metrics = metrics

    def handlers(self) -> Handlers:
        """topic -> event model -> handler: every saga event to the causal gate."""
        handlers: dict[str, dict[type[BaseModel], Handler]] = {
            topic: dict.fromkeys(models, self.on_saga_event)
            for topic, models in SAGA_EVENTS.items()
        }
        handlers[AUDIT_TOPIC] = {AuditRecorded: self.on_audit_recorded}
        return handlers

    async def prepare(self, conn: AsyncConnection, records: Sequence[Record]) -> None:
        """The batch's orders locked and read in two statements (``store.prefetch``)
        before its events are applied, instead of two per event. An event whose order id
        is not its record's key (the contract keys them alike) takes its own."""
        await store.prefetch(
            conn, [k for r in records if r.topic in SAGA_EVENTS and (k := r.key_str)]
        )

    async def on_saga_event(self, ctx: Context) -> None:
        assert ctx.envelope is not None
        ev = SagaEvent.parse(ctx.envelope)
        await store.lock_order(ctx.conn, ev.order_id)
        state = await store.load_state(ctx.conn, ev.order_id)
        applied = set(state.applied)
        if not is_ready(ev.saga_seq, ev.causation_id, applied):
            assert ev.saga_seq is not None  # a root is always ready
            await store.keep_early(
                ctx.conn, ev.order_id, ev.envelope, ev.payload, ev.saga_seq, ev.causation_id
            )
            log.info("order %s: %s %s came early, kept until %s is applied",
                     ev.order_id, ev.event_type, ev.event_id, ev.causation_id)  # fmt: skip
            return
        view = await self._project(ctx, ev, state.view)
        applied.add(ev.event_id)
        if state.has_early:  # read under the order's lock: none can appear meanwhile
            await self._release_early(ctx, ev.order_id, applied, view)

    async def _release_early(
        self, ctx: Context, order_id: str, applied: set[str], view: OrderView | None
    ) -> None:
        """Project the order's early events whose causes are now applied."""
        early = await store.early_events_of(ctx.conn, order_id)
        if not early:
            return
        by_id = {e.event_id: e for e in early}
        ready = release_order([(e.saga_seq, e.event_id, e.causation_id) for e in early], applied)
        for event_id in ready:
            view = await self._project(ctx, SagaEvent.parse(by_id[event_id].envelope), view)
            applied.add(event_id)
        # also drops early copies of events applied meanwhile (release_order skips them)
        dropped = [i for i in by_id if i in applied]
        await store.drop_early(ctx.conn, order_id, dropped, others_held=len(dropped) < len(by_id))

    async def _project(
        self, ctx: Context, ev: SagaEvent, view: OrderView | None
    ) -> OrderView | None:
        """Project one ready event onto the order's ``view``: decide, enter it as applied
        and save (one statement), emit on a change; the view as stored now."""
        outcome = decide(view, ev.event_type, ev.payload)
        if outcome.ignored_reason is not None:
            self.metrics.ignored.labels(outcome.ignored_reason).inc()
            log.info("order %s: %s %s ignored (%s)",
                     ev.order_id, ev.event_type, ev.event_id, outcome.ignored_reason)  # fmt: skip
        change = outcome.change
        if change is None or outcome.view is None:
            # a view changed without a status change (PaymentIntentCreated) is saved too
            saved = outcome.view if change is None and outcome.view != view else None
            await store.save_applied(ctx.conn, ev.order_id, ev.event_id, ctx.now, saved)
            return saved or view
        await store.save_applied(ctx.conn, ev.order_id, ev.event_id, ctx.now, outcome.view, change)
        status = validated(OrderStatusChanged, dataclasses.asdict(change))
        await ctx.emit(STATUS_TOPIC, status, key=ev.order_id, cause=ev.cause)
        self.metrics.status_changes.labels(change.status).inc()
        if (notification := outcome.notification) is not None:
            note = validated(CustomerNotificationRequested, dataclasses.asdict(notification))
            await ctx.emit(NOTIFICATIONS_TOPIC, note, key=ev.order_id, cause=ev.cause)
        return outcome.view

    async def on_audit_recorded(self, ctx: Context) -> None:
        """Append to ``audit_log``; the runtime inbox and the unique event id make a
        redelivery a no-op."""
        assert ctx.envelope is not None
        env = validated(Envelope, ctx.envelope)
        audit = validated(AuditRecorded, env.payload)
        await store.append_audit(ctx.conn, env.event_id, env.occurred_at, audit, ctx.now)
