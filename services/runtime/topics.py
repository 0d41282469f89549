"""``topics.yaml`` → the cluster: create missing topics, raise partitions, set configs.

Applying is idempotent: a second run changes nothing. What cannot be fixed in place
(fewer partitions requested than exist, a different replication factor) is reported as
drift and left alone — shrinking partitions would re-key every order.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.runtime.kafka import client_options

TOPICS_FILE = Path(__file__).resolve().parents[2] / "topics.yaml"

# The topics the services name in code (topics.yaml has them all, with their specs).
CHECKOUT_ORDERS_TOPIC = "checkout.orders.v1"
CONFIRMATIONS_TOPIC = "gateway.confirmations.v1"
CATALOG_TOPIC = "catalog.stock.v1"
PAYMENTS_TOPIC = "payments.events.v1"
INVENTORY_TOPIC = "inventory.events.v1"
CAPTURE_TOPIC = "capture.events.v1"
REFUNDS_TOPIC = "refunds.events.v1"
STATUS_TOPIC = "orders.status.v1"
NOTIFICATIONS_TOPIC = "customer.notifications.v1"
AUDIT_TOPIC = "audit.events.v1"
PAYMENT_REQUESTS_TOPIC = "payments.requests.v1"
STALLED_TOPIC = "saga.stalled.v1"
#: the monitor's faust table changelog (faust names it ``<app id>-<table>-changelog``)
MONITOR_CHANGELOG_TOPIC = "paysaga.monitor-sagas-changelog"


@dataclasses.dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    #: what the record key is (topics.yaml ``key``)
    key: str = ""

    @property
    def keyed_by_order(self) -> bool:
        """The record key is an order id (saga topics, confirmations, statuses)."""
        return re.match(r"(data\.)?order_id\b", self.key) is not None


@dataclasses.dataclass
class ApplyReport:
    created: list[str] = dataclasses.field(default_factory=list)
    partitions_raised: list[str] = dataclasses.field(default_factory=list)
    configs_changed: list[str] = dataclasses.field(default_factory=list)
    drift: list[str] = dataclasses.field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.partitions_raised or self.configs_changed)


def load_specs(
    path: Path = TOPICS_FILE,
    partitions: int | None = None,
    replication_factor: int | None = None,
    min_insync_replicas: int | None = None,
) -> list[TopicSpec]:
    """Read the topic specs; ``partitions``/``replication_factor``/``min_insync_replicas``
    override the defaults (``min.insync.replicas`` never above the replication factor)."""
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    d = doc["defaults"]
    rf = replication_factor or int(d["replication_factor"])
    min_isr = min_insync_replicas or int(d["min_insync_replicas"])
    specs = []
    for name, t in doc["topics"].items():
        t = t or {}
        configs = {
            "cleanup.policy": str(t.get("cleanup_policy", "delete")),
            "retention.ms": str(t.get("retention_ms", d["retention_ms"])),
            "min.insync.replicas": str(min(min_isr, rf)),
        }
        configs.update({k: str(v) for k, v in (t.get("config") or {}).items()})
        n = int(t.get("partitions", partitions or d["partitions"]))
        specs.append(TopicSpec(name, n, rf, configs, str(t.get("key", ""))))
    return specs


async def apply(bootstrap: str, specs: list[TopicSpec]) -> ApplyReport:
    report = ApplyReport()
    admin = AIOKafkaAdminClient(**client_options(bootstrap), request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=s.configs)
                    for s in missing
                ]
            )
            report.created = [s.name for s in missing]
        present = [s for s in specs if s.name in existing]
        if not present:
            return report
        described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in present])}
        raise_to: dict[str, NewPartitions] = {}
        for s in present:
            parts = described[s.name]["partitions"]
            if len(parts) < s.partitions:
                raise_to[s.name] = NewPartitions(s.partitions)
            elif len(parts) > s.partitions:
                report.drift.append(
                    f"{s.name}: has {len(parts)} partitions, topics.yaml asks {s.partitions} "
                    "(partitions cannot shrink; change topics.yaml or recreate the topic)"
                )
            rf = len(parts[0]["replicas"]) if parts else s.replication_factor
            if rf != s.replication_factor:
                report.drift.append(
                    f"{s.name}: replication factor {rf}, topics.yaml asks "
                    f"{s.replication_factor} (needs a partition reassignment)"
                )
        if raise_to:
            await admin.create_partitions(raise_to)
            report.partitions_raised = sorted(raise_to)
        current = await _topic_configs(admin, [s.name for s in present])
        stale = [
            s for s in present if any(current[s.name].get(k) != v for k, v in s.configs.items())
        ]
        if stale:
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, s.name, s.configs) for s in stale]
            )
            report.configs_changed = [s.name for s in stale]
    finally:
        await admin.close()
    return report


async def _topic_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, n, None) for n in names]
    )
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for _err, _msg, _type, name, entries in response.resources:
            out[name] = {entry[0]: entry[1] for entry in entries}
    return out


async def partitions_of(
    bootstrap: str, prefix: str = "", suffix: str = "", names: list[str] | None = None
) -> list[TopicPartition]:
    """Every partition of the named topics (or of all topics matching prefix/suffix)."""
    admin = AIOKafkaAdminClient(**client_options(bootstrap))
    await admin.start()
    try:
        if names is None:
            names = [
                t for t in await admin.list_topics() if t.startswith(prefix) and t.endswith(suffix)
            ]
        if not names:
            return []
        described = await admin.describe_topics(sorted(names))
        return sorted(
            TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]
        )
    finally:
        await admin.close()
