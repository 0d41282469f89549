"""The 3-broker cluster of the test profile, with the whole stack on it.

Run these tests on the cluster: ``PAYSAGA_KAFKA_BROKERS=3 make test
PYTEST_ARGS="tests/cluster -m cluster"`` (``make test`` itself keeps one broker and does
not collect this folder). The session fixture ``cluster`` starts every service on the
cluster and hands out the nodes to stop, kill and restart; after each test every node
runs again and every partition has its three replicas in sync, so a test starts from a
whole cluster whatever the one before it did to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services import devstack
from services.devclient import DevClient, envelope, produce, wait_for
from services.runtime.kafka import client_options
from services.runtime.topics import load_specs
from tests.conftest import Infra

#: the bridge gives up on Kafka after this and answers 503, so the gateway retries
PRODUCE_TIMEOUT_S = 3


@dataclasses.dataclass
class Cluster:
    profile: devstack.Profile
    nodes: list[devstack.KafkaNode]
    client: DevClient

    @property
    def bootstrap(self) -> str:
        return self.profile.bootstrap

    def node(self, node_id: int) -> devstack.KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def kill(self, node: devstack.KafkaNode) -> None:
        """``kill -9``: no controlled shutdown, no flush."""
        pid = devstack.node_pid(node)
        assert pid is not None, f"node {node.node_id} is not running"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not devstack.pid_running(pid), 30, f"node {node.node_id} gone")
        with_reaped(pid)

    def stop(self, node: devstack.KafkaNode) -> None:
        """A clean stop (SIGTERM: controlled shutdown moves its leaderships first)."""
        assert devstack.stop_pid(node.pidfile, str(node.properties), timeout=60)

    def start(self, node: devstack.KafkaNode) -> None:
        devstack.node_start(self.profile, node)

    def running(self) -> list[int]:
        return [n.node_id for n in self.nodes if devstack.node_pid(n) is not None]

    def partitions(self, topics: list[str]) -> list[dict[str, object]]:
        """``describe_topics`` of ``topics``: per partition its leader, replicas, ISR."""
        return asyncio.run(_describe(self.bootstrap, topics))

    def wait_in_sync(self, topics: list[str], timeout: float = 120) -> None:
        def whole() -> bool:
            try:
                parts = self.partitions(topics)
            except Exception:
                return False
            return all(len(p["isr"]) == len(self.nodes) for p in parts)  # type: ignore[arg-type]

        wait_for(whole, timeout, f"every replica of {len(topics)} topics in sync")

    def service_pids(self) -> dict[str, int | None]:
        return {
            sp.name: devstack.running_pid(
                self.profile.root / "pids" / f"{sp.name}.pid", f"-m {sp.module}"
            )
            for sp in devstack.SERVICE_PROCESSES
        }

    def set_stock(self, sku: str, available: int) -> None:
        value = envelope("StockLevelSet", {"sku": sku, "available": available})
        asyncio.run(produce(self.bootstrap, "catalog.stock.v1", [(sku, value)]))
        wait_for(
            lambda: self.client.db("inventory", "SELECT 1 FROM stock WHERE sku=%s", sku),
            60,
            f"stock of {sku}",
        )


def with_reaped(pid: int) -> None:
    """A killed node may be our child (started in this session): reap it."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def _describe(bootstrap: str, topics: list[str]) -> list[dict[str, object]]:
    admin = AIOKafkaAdminClient(**client_options(bootstrap), request_timeout_ms=5000)
    await admin.start()
    try:
        return [
            {"topic": t["topic"], **p} for t in await admin.describe_topics(topics)
            for p in t["partitions"]
        ]  # fmt: skip
    finally:
        await admin.close()


SAGA_TOPICS = [s.name for s in load_specs()]


@pytest.fixture(scope="session")
def cluster(infra: Infra) -> Iterator[Cluster]:
    profile = devstack.PROFILES["test"]
    nodes = devstack.kafka_nodes(profile)
    if len(nodes) != 3 or infra.bootstrap != profile.bootstrap:
        pytest.fail(
            "tests/cluster need the test profile's 3-broker cluster: run them with"
            ' PAYSAGA_KAFKA_BROKERS=3 make test PYTEST_ARGS="tests/cluster -m cluster"'
        )
    env = devstack.stack_env(profile)
    env.update(
        {
            "PAYSAGA_BRIDGE_PRODUCE_TIMEOUT_S": str(PRODUCE_TIMEOUT_S),
            "PAYSAGA_GATEWAY_TIMEOUT_S": "2",
            "PAYSAGA_POLL_TIMEOUT_MS": "200",
            "PAYSAGA_RELAY_POLL_S": "1",
            # the simulator retries a webhook the bridge refused soon, not after 15 s
            "PAYSAGA_DELIVERY_BACKOFF_MAX_S": "2",
        }
    )
    # these tests own the stack's services: started here with the settings above
    devstack.services_down(profile)
    devstack.services_up(profile, env)
    yield Cluster(profile, nodes, DevClient(infra.bootstrap, infra.database_url, env))
    devstack.services_down(profile)


@pytest.fixture(autouse=True)
def whole_cluster_after(cluster: Cluster) -> Iterator[None]:
    """Every node back and every replica in sync after each test, whatever it stopped."""
    cluster.wait_in_sync(SAGA_TOPICS)
    yield
    for node in cluster.nodes:
        cluster.start(node)
    cluster.wait_in_sync(SAGA_TOPICS, timeout=180)
