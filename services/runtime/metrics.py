"""Runtime metrics, created against an injected registry (one per process)."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        )
