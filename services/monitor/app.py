"""The monitor (docs/contract.md §3.5): a faust-streaming application, consumer group
``paysaga.monitor``, that watches ``orders.status.v1`` and reports stalled sagas on
``saga.stalled.v1``.

- Agent ``statuses`` keeps the table ``sagas`` (order id → ``domain.Saga``), whose
  changelog is ``paysaga.monitor-sagas-changelog`` (topics.yaml): a restarted monitor
  recovers it before it judges anything, then reads the status topic on from its
  committed offsets. A new consumer group reads the compacted status topic from its start.
- A timer (``PAYSAGA_MONITOR_CHECK_INTERVAL_S``) walks the open sagas (the whole table
  now and then, to prune final markers) and reports each stalled order once
  (``stall_check.py``). No check runs while the table is being recovered or the group
  rebalances; the next one walks the whole table.
- HTTP is faust's own web server (one per process): ``/healthz``, ``/readyz``,
  ``/metrics`` on ``PAYSAGA_MONITOR_PORT`` (``web.py``, with the metrics).

This module wires the faust app: settings, broker credentials, topics, table, agent.

The monitor only observes: it writes no database and no saga topic, and losing it
delays an alert and never changes money.

``python -m services.monitor.app`` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import faust
from prometheus_client import CollectorRegistry
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.contract import OrderStatusChanged
from schemas.envelope import Envelope, event_type_of
from services.monitor import domain
from services.monitor.domain import Saga, StatusChange
from services.monitor.settings import StallSettings
from services.monitor.stall_check import StallCheck
from services.monitor.web import MonitorMetrics, add_pages
from services.runtime import tracing
from services.runtime.kafka import client_options
from services.runtime.service import configure_logging
from services.runtime.settings import KafkaSettings
from services.runtime.topics import MONITOR_CHANGELOG_TOPIC, STALLED_TOPIC, STATUS_TOPIC

GROUP = "paysaga.monitor"
#: faust names the changelog ``<app id>-<table>-changelog``: MONITOR_CHANGELOG_TOPIC
SAGAS_TABLE = "sagas"

log = logging.getLogger("paysaga.monitor")


class MonitorSettings(KafkaSettings, StallSettings):
    """``PAYSAGA_MONITOR_*``; the deadlines are ``StallSettings``'."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    monitor_host: str = "127.0.0.1"
    monitor_port: int = 8085
    monitor_check_interval_s: float = Field(1.0, gt=0)


def _brokers(bootstrap: str) -> list[str]:
    return [f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip()]


def broker_credentials(settings: KafkaSettings) -> Any:
    """faust's form of ``client_options``: the same TLS context, mechanism, user and
    password as every other paysaga client (None: plaintext)."""
    options = client_options(settings.kafka_bootstrap_servers, settings)
    ssl_context = options.get("ssl_context")
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            ssl_context=ssl_context,
            mechanism=options["sasl_mechanism"],
        )
    return faust.SSLCredentials(ssl_context) if ssl_context is not None else None


def status_change(
    key: bytes | None, value: bytes | None, trace: bytes | None = None
) -> StatusChange:
    """The monitor's view of one status record (``trace``: its ``traceparent`` header);
    raises ValueError on a malformed one."""
    if value is None:
        raise ValueError("tombstone")
    env = Envelope.model_validate_json(value)
    if env.event_type != event_type_of(OrderStatusChanged):
        raise ValueError(f"unexpected event type {env.event_type}")
    change = OrderStatusChanged.model_validate(env.payload)
    if key is not None and key.decode() != change.order_id:
        raise ValueError("record key is not the payload's order_id")
    return StatusChange(
        order_id=change.order_id,
        status=change.status,
        version=change.version,
        at=env.occurred_at.timestamp(),
        event_id=env.event_id,
        correlation_id=env.correlation_id,
        saga_seq=env.saga_seq,
        traceparent=trace.decode() if trace is not None and tracing.parse(trace) else None,
    )


class Monitor:
    """The faust app with its agent, timer (``StallCheck``) and pages; ``run()`` runs it."""

    def __init__(self, settings: MonitorSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = MonitorMetrics(registry)
        self.minutes = domain.MinuteOutcomes()
        self.partitions_known = False
        app = faust.App(
            GROUP,
            broker=_brokers(settings.kafka_bootstrap_servers),
            broker_credentials=broker_credentials(settings),
            store="memory://",
            # topics.yaml is the source of truth: `paysaga topics apply` creates the
            # changelog with the status topic's partition count; the leader topic is
            # not needed (no timer runs on the leader only). One member is assumed: the
            # memory store keeps rows of a partition revoked from it
            # after a rebalance, so two members could both report such an order.
            topic_allow_declare=False,
            topic_disable_leader=True,
            table_standby_replicas=0,
            consumer_auto_offset_reset="earliest",
            # acks=all; faust offers no idempotence but with exactly_once (transactions),
            # so a retried send may duplicate: a report keeps its event id, a changelog
            # record its key (README "Running on a cluster")
            producer_acks=-1,
            web_bind=settings.monitor_host,
            web_host=settings.monitor_host,
            web_port=settings.monitor_port,
            web_in_thread=False,
            # the memory store keeps nothing on disk, but faust insists on the folder
            datadir=Path(tempfile.gettempdir()) / f"paysaga-monitor-{settings.monitor_port}",
            worker_redirect_stdouts=False,
        )
        self.app = app
        self.status_topic = app.topic(
            STATUS_TOPIC, key_serializer="raw", value_serializer="raw", internal=False
        )
        stalled_topic = app.topic(
            STALLED_TOPIC, key_serializer="raw", value_serializer="raw", internal=False
        )
        # use_partitioner: the timer records reports outside stream iteration; the
        # producer's partitioner (murmur2, as every paysaga producer's) puts an order's
        # changelog record in its status partition
        self.sagas = app.Table(
            SAGAS_TABLE,
            default=None,
            # bytes keys: serialised raw, the status record's key byte for byte
            key_type=bytes,
            use_partitioner=True,
        )
        changelog = self.sagas.changelog_topic.get_topic_name()
        if changelog != MONITOR_CHANGELOG_TOPIC:  # topics.yaml declares that one
            raise RuntimeError(f"changelog {changelog} is not declared in topics.yaml")
        self.stalls = StallCheck(
            app, self.sagas, stalled_topic, settings.deadlines(), self.metrics, self.minutes
        )
        app.agent(self.status_topic, name="statuses")(self.on_statuses)
        app.timer(settings.monitor_check_interval_s, name="check")(self.check)
        add_pages(app, registry, self.readiness)

    # ---------------------------------------------------------------- status records

    async def on_statuses(self, stream: Any) -> None:
        # a coroutine, not an async generator: faust looks for a reply address and sinks
        # for each value an agent yields, and formats a debug line for it even when
        # debug is off (that line alone: 3.5 % of the monitor's samples at 40 orders/s);
        # either way the stream acks each event as the next one is read
        await self.partitioner_ready()
        async for event in stream.events():
            self.on_status(event.key, event.value, event.message)

    def on_status(self, key: bytes | None, value: bytes | None, message: Any) -> None:
        headers = dict(message.headers or ())  # faust gives a list of pairs or a mapping
        try:
            change = status_change(key, value, headers.get(tracing.TRACEPARENT))
        except ValueError as exc:
            self.metrics.records.labels("invalid").inc()
            log.error(
                "status record %s:%s@%s not understood, skipped: %s",
                message.topic,
                message.partition,
                message.offset,
                str(exc).splitlines()[0],
            )
            return
        key = change.order_id.encode()
        raw = self.sagas.get(key)
        saga, outcome = domain.note_status(None if raw is None else Saga.from_dict(raw), change)
        if saga is None:
            self.metrics.records.labels("ignored").inc()
            return
        self.sagas[key] = saga.to_dict()
        self.stalls.noted(key, saga)
        self.metrics.records.labels("applied").inc()
        if outcome is not None:
            self.metrics.outcomes.labels(outcome.status.value).inc()
            self.minutes.add(outcome.status, outcome.at)
            if outcome.duration_s is not None:
                self.metrics.duration.observe(outcome.duration_s)

    async def partitioner_ready(self) -> None:
        """The producer knows the changelog's partitions. faust's ``use_partitioner``
        hashes a key with the producer's metadata synchronously, and aiokafka fetches a
        topic's metadata only when it first sends to it: without this the first table
        write fails (``TypeError: 'NoneType' object is not iterable``). faust does not
        verify co-partitioning for such a table either, so it is checked here."""
        if self.partitions_known:
            return
        # the aiokafka producer: faust's own has no partitions_for
        producer = cast(Any, self.app.producer)._ensure_producer()
        changelog = await producer.partitions_for(MONITOR_CHANGELOG_TOPIC)
        statuses = await producer.partitions_for(STATUS_TOPIC)
        if len(changelog) != len(statuses):
            raise RuntimeError(
                f"{MONITOR_CHANGELOG_TOPIC} has {len(changelog)} partitions, {STATUS_TOPIC}"
                f" {len(statuses)}: run `paysaga topics apply`"
            )
        self.partitions_known = True

    # ---------------------------------------------------------------- the check

    def judging(self) -> bool:
        """The table is whole: recovered, and no rebalance under way."""
        recovered = bool(cast(Any, self.app.tables).recovery.completed.is_set())
        return self.partitions_known and recovered and not self.app.rebalancing

    async def check(self) -> None:
        """The timer: one pass over the table; a failing pass is logged, and /readyz turns red
        while no pass completes."""
        try:
            await self.partitioner_ready()
            if self.judging():
                await self.stalls.run()
            else:  # recovering or rebalancing: rows may come and go beyond ``noted``
                self.stalls.forget_open()
        except Exception:
            log.exception("stall check failed")

    def readiness(self) -> dict[str, bool]:
        """The table whole, the check running, the last SagaStalled send not failed."""
        stale_after = max(10.0, 5 * self.settings.monitor_check_interval_s)
        return {
            "table": self.judging(),
            "checking": self.stalls.last_check is not None
            and time.monotonic() - self.stalls.last_check < stale_after,
            "kafka": not self.stalls.send_failed,
        }

    def run(self) -> None:
        worker = faust.Worker(self.app, loglevel="INFO", override_logging=False, quiet=True)
        worker.spinner = None  # it writes terminal escapes into the log
        worker.execute_from_commandline()


def main() -> None:
    configure_logging()
    Monitor(MonitorSettings(), CollectorRegistry()).run()


if __name__ == "__main__":
    main()
