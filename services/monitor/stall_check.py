"""The monitor's timer (``PAYSAGA_MONITOR_CHECK_INTERVAL_S``): a pass over the table of
sagas. Each order that needs an alert gets one ``SagaStalled``, sent and acknowledged
*before* the table records the report (so a crash in between re-sends it once, with the
same event id — never loses it); the pass also sets ``paysaga_sagas_stalled{status}``
from the table, so the gauge falls at the next check after an order moves on.

A ``SagaStalled`` is an effect of the order's last status record: its envelope comes
from that record's ``Cause`` (causation, correlation, ``saga_seq``) as every outbox
event's does, and it carries a ``traceparent`` of its own span in the order's trace
(a new trace if the status record carried none)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import faust

from schemas.envelope import dump, event_type_of, new_envelope
from schemas.events import SagaStalled
from services.monitor import domain
from services.monitor.domain import Deadlines, Saga
from services.monitor.web import MonitorMetrics
from services.runtime import tracing
from services.runtime.outbox import Cause

log = logging.getLogger("paysaga.monitor")


#: how often a pass walks the whole table, final markers included (to prune the ones past
#: ``domain.FINAL_KEPT_S``); the passes between walk only the open sagas
WHOLE_TABLE_EVERY_S = 300.0


class StallCheck:
    """One pass at a time over ``sagas`` (the faust table), reporting on ``topic``;
    ``last_check`` and ``send_failed`` tell ``/readyz`` how it goes.

    The table keeps a final order's marker for a day, so that a re-delivered status does
    not reopen it: most of its rows are final. A pass walks only the open ones (``open``,
    kept by ``noted`` as statuses are applied) and the whole table every
    ``WHOLE_TABLE_EVERY_S``, and after the table changed under it (``forget_open``: a
    recovery or a rebalance)."""

    def __init__(
        self,
        app: faust.App,
        sagas: Any,
        topic: Any,
        deadlines: Deadlines,
        metrics: MonitorMetrics,
        minutes: domain.MinuteOutcomes,
    ) -> None:
        self.app = app
        self.sagas = sagas
        self.topic = topic
        self.deadlines = deadlines
        self.metrics = metrics
        self.minutes = minutes
        self.last_check: float | None = None
        self.send_failed = False
        #: the keys of the open sagas; None until a pass walked the whole table
        self.open: set[bytes] | None = None
        self._whole_walked = 0.0

    def noted(self, key: bytes, saga: Saga) -> None:
        """The table's row ``key`` is now ``saga``."""
        if self.open is not None:
            if domain.is_final(saga.status):
                self.open.discard(key)
            else:
                self.open.add(key)

    def forget_open(self) -> None:
        """The table may have changed beyond ``noted``: the next pass walks all of it."""
        self.open = None

    async def run(self) -> None:
        """One pass: over the open sagas, or the whole table (the caller makes sure it is
        whole) once ``WHOLE_TABLE_EVERY_S`` passed or ``open`` was forgotten."""
        now = time.time()
        whole = self.open is None or time.monotonic() - self._whole_walked >= WHOLE_TABLE_EVERY_S
        if self.open is None:
            self.open = set()  # ``noted`` keeps it from here on, during this pass too
        open_keys = self.open  # ``forget_open`` during the pass leaves it to the next one
        keys = list(self.sagas.keys()) if whole else list(open_keys)
        sagas: list[Saga] = []
        for key in keys:
            raw = self.sagas.get(key)
            saga = None if raw is None else Saga.from_dict(raw)
            if saga is None or domain.is_final(saga.status):
                open_keys.discard(key)  # never stalled; a final marker is kept until prunable
                if saga is not None and domain.prunable(saga, now):
                    del self.sagas[key]
                continue
            open_keys.add(key)
            if domain.needs_alert(saga, now, self.deadlines):
                saga = await self.report(key.decode(), saga, now)
            sagas.append(saga)
        if whole:
            self._whole_walked = time.monotonic()
        for status, n in domain.stalled_counts(sagas, now, self.deadlines).items():
            self.metrics.stalled.labels(status).set(n)
        for status, n in self.minutes.last_complete(now).items():
            self.metrics.last_minute.labels(status).set(n)
        self.last_check = time.monotonic()

    async def report(self, order_id: str, saga: Saga, now: float) -> Saga:
        """One SagaStalled, acknowledged, then recorded; a failed send is tried again at
        the next check."""
        waited = domain.stalled_for(saga, now) or 0.0
        event = SagaStalled(
            order_id=order_id,
            status=saga.status,
            stalled_for_seconds=int(waited),
            deadline_seconds=self.deadlines.for_status(saga.status),
        )
        cause = Cause(saga.event_id, saga.saga_seq, saga.correlation_id, saga.traceparent)
        envelope = new_envelope(
            event_type_of(SagaStalled),
            event,
            now=datetime.fromtimestamp(now, UTC),
            event_id=domain.stalled_event_id(order_id, saga),
            correlation_id=cause.correlation_id,
            causation_id=cause.event_id or None,
            saga_seq=cause.next_seq,
        )
        try:
            attributes = {"paysaga.order_id": order_id}
            with tracing.span("monitor SagaStalled", cause.traceparent, attributes) as tp:
                sent = await self.topic.send(
                    key=order_id.encode(),
                    value=dump(envelope),
                    headers=[(tracing.TRACEPARENT, tp.encode())],
                )
                await sent
        except Exception as exc:  # noqa: BLE001 -- retried at the next check
            self.send_failed = True
            log.warning("SagaStalled for order %s not sent, retrying: %r", order_id, exc)
            return saga
        self.send_failed = False
        reported = saga.with_alerted()
        self.sagas[order_id.encode()] = reported.to_dict()
        # the changelog record acknowledged too: a restart from here on does not re-send
        await self.app.producer.flush()
        self.metrics.reported.labels(saga.status.value).inc()
        log.warning(
            "saga stalled: order %s in %s for %ss (deadline %ss)",
            order_id,
            saga.status.value,
            event.stalled_for_seconds,
            event.deadline_seconds,
        )
        return reported
