"""Runtime metrics, created against an injected registry (one per process)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncConnection

#: a step (event in -> event out) of a few milliseconds up to retries of minutes
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
#: one gateway call, its retries with backoff included
GATEWAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: ``conn.info`` key: the steps handled in the connection's open transaction
_STEPS = "paysaga_steps"

#: a handled record whose handler wrote outbox rows: (its event type, its Kafka time in s)
Step = tuple[str, float]


def track_steps(conn: AsyncConnection) -> list[Step]:
    """Collect the steps handled in ``conn``'s transaction (``note_step``); observe them
    with ``RuntimeMetrics.observe_steps`` once it committed."""
    steps: list[Step] = []
    conn.info[_STEPS] = steps
    return steps


def note_step(conn: AsyncConnection, event_type: str, record_timestamp_ms: int) -> None:
    steps = conn.info.get(_STEPS)
    if steps is not None:
        steps.append((event_type, record_timestamp_ms / 1000))


@dataclasses.dataclass(frozen=True)
class RuntimeMetrics:
    records: Counter
    processing_seconds: Histogram
    batch_size: Histogram
    retries: Counter
    outbox_backlog: Gauge
    outbox_oldest_age: Gauge
    outbox_published: Counter
    outbox_stuck: Gauge
    consumer_lag: Gauge
    last_progress: Gauge
    position_anomalies: Counter
    step_latency: Histogram
    dead_letters_open: Gauge

    def observe_steps(self, service: str, steps: Sequence[Step]) -> None:
        """The steps of a transaction that committed now: record time -> now."""
        now = time.time()
        for event_type, at in steps:
            self.step_latency.labels(service, event_type).observe(max(0.0, now - at))

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RuntimeMetrics:
        return cls(
            records=Counter(
                "paysaga_records_total",
                "Consumed records by outcome: processed, duplicate, skipped, parked, "
                "dead_lettered, released, control_failed, revoked, lost_to_retention",
                ["service", "topic", "outcome"],
                registry=registry,
            ),
            processing_seconds=Histogram(
                "paysaga_processing_seconds",
                "Time to handle one partition batch, transaction included",
                ["service"],
                registry=registry,
            ),
            batch_size=Histogram(
                "paysaga_batch_size_records",
                "Records per partition batch",
                ["service"],
                buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
                registry=registry,
            ),
            retries=Counter(
                "paysaga_retries_total",
                "Transient failures retried in place",
                ["service", "error_class"],
                registry=registry,
            ),
            outbox_backlog=Gauge(
                "paysaga_outbox_backlog_records",
                "Outbox rows not yet published",
                ["service"],
                registry=registry,
            ),
            outbox_oldest_age=Gauge(
                "paysaga_outbox_oldest_age_seconds",
                "Age of the oldest unpublished outbox row",
                ["service"],
                registry=registry,
            ),
            outbox_published=Counter(
                "paysaga_outbox_published_total",
                "Outbox rows published to Kafka",
                ["service"],
                registry=registry,
            ),
            outbox_stuck=Gauge(
                "paysaga_outbox_stuck_records",
                "Outbox rows not published for want of an operator: dead (refused by Kafka"
                " for good; `paysaga outbox list`) or blocked (behind a dead row of its key)",
                ["service", "state"],
                registry=registry,
            ),
            consumer_lag=Gauge(
                "paysaga_consumer_lag_records",
                "Records behind the high watermark, summed over assigned partitions",
                ["service", "topic"],
                registry=registry,
            ),
            last_progress=Gauge(
                "paysaga_consumer_last_progress_timestamp_seconds",
                "Unix time of the last successful poll or commit",
                ["service"],
                registry=registry,
            ),
            position_anomalies=Counter(
                "paysaga_consumer_position_anomalies_total",
                "Partitions whose stored position did not fit the log: beyond_log_end (reset "
                "to the log start), no_stored_position (started at Kafka's committed offset)",
                ["service", "topic", "kind"],
                registry=registry,
            ),
            step_latency=Histogram(
                "paysaga_step_latency_seconds",
                "One saga step, event in -> event out: from a consumed record's Kafka "
                "timestamp to the commit of the outbox rows its handler wrote",
                ["service", "event_type"],
                buckets=STEP_BUCKETS,
                registry=registry,
            ),
            dead_letters_open=Gauge(
                "paysaga_dead_letters_open",
                "Dead letters of the service's consumer group not yet replayed or purged",
                ["service"],
                registry=registry,
            ),
        )


@dataclasses.dataclass(frozen=True)
class GatewayMetrics:
    """The gateway client's (services that call the gateway: payments, capture, refunds)."""

    calls: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> GatewayMetrics:
        return cls(
            calls=Histogram(
                "paysaga_gateway_call_seconds",
                "Gateway calls, their retries included, by operation (capture, void, refund, "
                "lookup, payment_intent) and outcome (succeeded, "
                "declined, not_found, unknown, unavailable, protocol_error, error)",
                ["operation", "outcome"],
                buckets=GATEWAY_BUCKETS,
                registry=registry,
            )
        )
