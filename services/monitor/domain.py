"""Pure decisions of the monitor (docs/contract.md §3.5).

Guarantees: no I/O, no clock, no randomness — callers pass ``now`` (epoch seconds).

- An order's saga is ``Saga`` (its status, since when, the statuses already reported),
  built by ``note_status`` from each ``OrderStatusChanged``. ``since`` is the time the
  order *entered* the status (the status event's ``occurred_at``), never the time the
  monitor read it: a monitor that restarts, or reads the topic from its start, judges
  the same.
- A change whose ``version`` is not above the saga's is a duplicate or stale record and
  changes nothing. A final order keeps a small marker (status, version) for
  ``FINAL_KEPT_S`` (a day), so a re-delivered older record cannot reopen it and raise a false
  alarm; after that ``prunable`` says it may go.
- ``needs_alert`` is true at most once per (order, status) within one payment attempt:
  ``with_alerted`` records the report, and a new attempt (after a final status) starts
  with none.
- ``NEEDS_RECONCILIATION`` counts as stalled at once (deadline 1 s by default): an
  operator must act.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.contract import OrderStatus

__all__ = [
    "FINAL",
    "FINAL_KEPT_S",
    "OPEN",
    "Deadlines",
    "MinuteOutcomes",
    "Outcome",
    "Saga",
    "StatusChange",
    "is_final",
    "is_stalled",
    "needs_alert",
    "note_status",
    "prunable",
    "stalled_counts",
    "stalled_event_id",
    "stalled_for",
]

FINAL: frozenset[OrderStatus] = frozenset(
    {OrderStatus.PAID_CONFIRMED, OrderStatus.PAYMENT_FAILED, OrderStatus.REFUNDED}
)
#: the statuses an order can stall in, in contract order
OPEN: tuple[OrderStatus, ...] = tuple(s for s in OrderStatus if s not in FINAL)
#: how long a final order's marker stays in the table: longer than any re-delivery — a
#: restart re-reads from the offsets faust committed seconds before, but an outbox relay
#: re-publishes the rows it had sent and not marked once its database is back, after an
#: outage of hours, maybe. The changelog is compacted well within it (``segment.ms``,
#: ``delete.retention.ms`` in topics.yaml), so a restarted monitor recovers about one row
#: per order of this last day, not every status since the topic was made
FINAL_KEPT_S = 86_400.0


def is_final(status: OrderStatus) -> bool:
    return status in FINAL


@dataclasses.dataclass(frozen=True)
class Deadlines:
    """``default_s`` for every open status, ``overrides`` per status;
    ``NEEDS_RECONCILIATION`` is 1 s unless overridden."""

    default_s: int = 900
    overrides: Mapping[OrderStatus, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default_s < 1 or any(v < 1 for v in self.overrides.values()):
            raise ValueError("stall deadlines must be at least 1 s")

    def for_status(self, status: OrderStatus) -> int:
        if status in self.overrides:
            return self.overrides[status]
        return 1 if status is OrderStatus.NEEDS_RECONCILIATION else self.default_s


@dataclasses.dataclass(frozen=True)
class StatusChange:
    """What the monitor takes from one ``OrderStatusChanged`` record and its envelope."""

    order_id: str
    status: OrderStatus
    version: int
    at: float
    event_id: str
    correlation_id: str | None = None
    saga_seq: int | None = None
    #: the record's ``traceparent`` header, if it carried a valid one
    traceparent: str | None = None


@dataclasses.dataclass(frozen=True)
class Saga:
    """One order in the monitor's table (stored as ``to_dict()``)."""

    status: OrderStatus
    version: int
    since: float
    #: when the attempt entered PENDING_PAYMENT (None: not seen)
    started: float | None = None
    #: statuses of this attempt already reported as stalled
    alerted: tuple[OrderStatus, ...] = ()
    #: the status event, for the SagaStalled envelope's causation, correlation and trace
    event_id: str = ""
    correlation_id: str | None = None
    saga_seq: int | None = None
    traceparent: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "version": self.version,
            "since": self.since,
            "started": self.started,
            "alerted": [s.value for s in self.alerted],
            "event_id": self.event_id,
            "correlation_id": self.correlation_id,
            "saga_seq": self.saga_seq,
            "traceparent": self.traceparent,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Saga:
        return cls(
            status=OrderStatus(d["status"]),
            version=int(d["version"]),
            since=float(d["since"]),
            started=None if d.get("started") is None else float(d["started"]),
            alerted=tuple(OrderStatus(s) for s in d.get("alerted") or ()),
            event_id=str(d.get("event_id") or ""),
            correlation_id=d.get("correlation_id"),
            saga_seq=d.get("saga_seq"),
            traceparent=d.get("traceparent"),  # absent in rows written before it was kept
        )

    def with_alerted(self) -> Saga:
        return dataclasses.replace(self, alerted=(*self.alerted, self.status))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """An attempt reached a final status; ``duration_s`` from PENDING_PAYMENT, if seen."""

    status: OrderStatus
    at: float
    duration_s: float | None


def note_status(saga: Saga | None, change: StatusChange) -> tuple[Saga | None, Outcome | None]:
    """The saga after ``change`` (None: nothing changes) and the attempt's outcome, if
    ``change`` ends it."""
    if saga is not None and change.version <= saga.version:
        return None, None
    new_attempt = saga is None or is_final(saga.status)
    started = None if new_attempt or saga is None else saga.started
    if change.status is OrderStatus.PENDING_PAYMENT:
        started = change.at
    new = Saga(
        status=change.status,
        version=change.version,
        since=change.at,
        started=started,
        alerted=() if new_attempt or saga is None else saga.alerted,
        event_id=change.event_id,
        correlation_id=change.correlation_id,
        saga_seq=change.saga_seq,
        traceparent=change.traceparent,
    )
    outcome = None
    if is_final(change.status) and (saga is None or not is_final(saga.status)):
        duration = None if started is None else max(0.0, change.at - started)
        outcome = Outcome(change.status, change.at, duration)
    return new, outcome


def stalled_for(saga: Saga, now: float) -> float | None:
    """Seconds past entering its status if the order is stalled now, else None."""
    if is_final(saga.status):
        return None
    waited = now - saga.since
    return waited if waited >= 0 else None


def is_stalled(saga: Saga, now: float, deadlines: Deadlines) -> bool:
    waited = stalled_for(saga, now)
    return waited is not None and waited >= deadlines.for_status(saga.status)


def needs_alert(saga: Saga, now: float, deadlines: Deadlines) -> bool:
    """Stalled, and not yet reported for this status."""
    return is_stalled(saga, now, deadlines) and saga.status not in saga.alerted


def prunable(saga: Saga, now: float) -> bool:
    return is_final(saga.status) and now - saga.since > FINAL_KEPT_S


def stalled_counts(sagas: Iterable[Saga], now: float, deadlines: Deadlines) -> Counter[str]:
    """Stalled orders per open status, every open status present (0 when none)."""
    counts: Counter[str] = Counter({s.value: 0 for s in OPEN})
    for saga in sagas:
        if is_stalled(saga, now, deadlines):
            counts[saga.status.value] += 1
    return counts


def stalled_event_id(order_id: str, saga: Saga) -> str:
    """The same for every report of this (order, status) visit: a SagaStalled emitted
    again after a crash (between the send and recording it) has the same event id, so
    readers can drop it."""
    digest = hashlib.sha256(f"stalled:{order_id}:{saga.status}:{saga.version}".encode())
    return digest.hexdigest()[:32]


@dataclasses.dataclass
class MinuteOutcomes:
    """Outcome counts per tumbling minute of event time (the final status's
    ``occurred_at``): ``last_complete(now)`` is the minute before the current one. Only
    the last few minutes are kept: Prometheus keeps the history."""

    width_s: int = 60
    windows: dict[int, Counter[str]] = dataclasses.field(default_factory=dict)

    def add(self, status: OrderStatus, at: float) -> None:
        start = int(at // self.width_s) * self.width_s
        self.windows.setdefault(start, Counter())[status.value] += 1

    def last_complete(self, now: float) -> dict[str, int]:
        current = int(now // self.width_s) * self.width_s
        for start in [s for s in self.windows if s < current - 2 * self.width_s]:
            del self.windows[start]
        counts = self.windows.get(current - self.width_s, Counter())
        return {s.value: counts[s.value] for s in FINAL}
