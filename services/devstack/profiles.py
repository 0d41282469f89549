"""Where the local stack lives and listens: the checkout's folders, the profiles (dev,
test, bench) with their ports, the layout of a profile's Kafka nodes, and the service
processes with their ports. Pure data: nothing here starts or stops anything."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / ".local"


class StackError(RuntimeError):
    """A local component could not be provisioned or did not become ready."""


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    kafka_port: int
    controller_port: int
    pg_port: int
    #: base port of the services; see SERVICE_PORTS for the offsets
    http_base: int
    #: added to each service's contract port (0 for dev: the contract's ports)
    service_shift: int = 0
    #: Kafka nodes: 1 (``make up``, ``make test``) or 3 (``PAYSAGA_KAFKA_BROKERS=3``)
    brokers: int = 1

    @property
    def root(self) -> Path:
        return LOCAL / self.name

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in kafka_nodes(self))

    @property
    def secure_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.secure_port}" for n in kafka_nodes(self))

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://paysaga@127.0.0.1:{self.pg_port}"


def _test_profile() -> Profile:
    """The test profile; ``PAYSAGA_TEST_PORT_SHIFT`` moves all its ports, so two
    checkouts on one machine can run their suites side by side."""
    shift = int(os.environ.get("PAYSAGA_TEST_PORT_SHIFT", "0"))
    return Profile(
        "test",
        19092 + shift,
        19093 + shift,
        55433 + shift,
        18000 + shift,
        10000 + shift,
        _brokers(),
    )


def _brokers() -> int:
    return int(os.environ.get("PAYSAGA_KAFKA_BROKERS", "1"))


def _bench_profile() -> Profile:
    """``make bench``'s own stack, apart from dev and test; ``PAYSAGA_BENCH_PORT_SHIFT``
    moves its ports as the test profile's shift does."""
    shift = int(os.environ.get("PAYSAGA_BENCH_PORT_SHIFT", "0"))
    return Profile(
        "bench",
        29092 + shift,
        29093 + shift,
        56433 + shift,
        28000 + shift,
        20000 + shift,
        _brokers(),
    )


PROFILES = {
    "dev": Profile("dev", 9092, 9093, 55432, 8000, brokers=_brokers()),
    "test": _test_profile(),
    "bench": _bench_profile(),
}


@dataclasses.dataclass(frozen=True)
class KafkaNode:
    """One local Kafka process (broker and controller in one)."""

    node_id: int
    #: PLAINTEXT listener: the stack's own clients and replication between the nodes
    port: int
    controller_port: int
    #: SASL_SSL listener (SCRAM-SHA-512) for clients that test the secured path
    secure_port: int
    home: Path

    @property
    def properties(self) -> Path:
        """Its server.properties: also the marker of its command line."""
        return self.home / "server.properties"

    @property
    def pidfile(self) -> Path:
        return self.home / "kafka.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def kafka_nodes(p: Profile, brokers: int | None = None) -> list[KafkaNode]:
    """The profile's Kafka nodes. One node keeps the layout it always had (broker on
    ``kafka_port``, controller on ``controller_port``, folder ``kafka/``). Three nodes
    take the broker ports ``kafka_port``..+2 (9092-9094 for dev), controller ports
    ``kafka_port``+50..+52 — a range of their own, since the single node's controller
    port is the second broker's — and folders ``kafka/node-<id>/``. Every node's
    SASL_SSL listener is on ``kafka_port`` + 10 + (id - 1)."""
    n = p.brokers if brokers is None else brokers
    base = p.root / "kafka"
    if n == 1:
        return [KafkaNode(1, p.kafka_port, p.controller_port, p.kafka_port + 10, base)]
    return [
        KafkaNode(i, p.kafka_port + i - 1, p.kafka_port + 49 + i, p.kafka_port + 9 + i,
                  base / f"node-{i}")
        for i in range(1, n + 1)
    ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ServiceProcess:
    name: str
    module: str
    #: offset from the profile's http_base, except the contract's fixed ports (dev)
    port: int
    #: a consuming service that may run as several members of its consumer groups
    #: (``services_up(instances=n)``); the others stay one process
    scales_out: bool = False


#: Each service runs as its own process. Contract ports (dev): status API 8080,
#: gateway bridge 8070, gateway simulator 8090; the test profile adds 10000.
SERVICE_PROCESSES: tuple[ServiceProcess, ...] = (
    ServiceProcess("gatewaysim", "services.gatewaysim.app", 8090),
    ServiceProcess("bridge", "services.bridge.app", 8070),
    ServiceProcess("payments", "services.payments.app", 8081, scales_out=True),
    ServiceProcess("inventory", "services.inventory.app", 8082, scales_out=True),
    ServiceProcess("capture", "services.capture.app", 8083, scales_out=True),
    ServiceProcess("refunds", "services.refunds.app", 8084, scales_out=True),
    ServiceProcess("orders", "services.orders.app", 8080, scales_out=True),
    ServiceProcess("monitor", "services.monitor.app", 8085),
)


def service_port(p: Profile, sp: ServiceProcess) -> int:
    return sp.port + p.service_shift


#: instance ``i`` of a service listens ``(i - 1) * INSTANCE_PORT_STEP`` above the first,
#: clear of every other service's port and of the next profile shift (+1000)
INSTANCE_PORT_STEP = 100
MAX_INSTANCES = 9


@dataclasses.dataclass(frozen=True)
class ServiceInstance:
    """One process of a service. The first keeps the service's name, port, pid file and
    log (``pids/payments.pid``); instance ``i`` ≥ 2 is ``<name>-<i>`` (``payments-2``:
    ``pids/payments-2.pid``, ``logs/payments-2.log``) on its own port, another member of
    the same consumer groups."""

    service: ServiceProcess
    number: int = 1

    @property
    def name(self) -> str:
        return self.service.name if self.number == 1 else f"{self.service.name}-{self.number}"

    @property
    def marker(self) -> str:
        """What its command line has (``running_pid``)."""
        return f"-m {self.service.module}"

    def port(self, first: int) -> int:
        """Its port, given the first instance's."""
        return first + INSTANCE_PORT_STEP * (self.number - 1)

    def pidfile(self, p: Profile) -> Path:
        return p.root / "pids" / f"{self.name}.pid"

    def log(self, p: Profile) -> Path:
        return p.root / "logs" / f"{self.name}.log"


def service_instances(instances: int = 1) -> list[ServiceInstance]:
    """The processes of a stack with ``instances`` of each service that scales out (one
    of every other), in start order."""
    if not 1 <= instances <= MAX_INSTANCES:
        raise ValueError(f"instances must be within 1..{MAX_INSTANCES}")
    return [
        ServiceInstance(sp, i)
        for sp in SERVICE_PROCESSES
        for i in range(1, (instances if sp.scales_out else 1) + 1)
    ]


def instances_on_disk(p: Profile) -> list[ServiceInstance]:
    """Every instance of ``p`` that has a pid file (the first of each service always):
    what ``down`` and ``status`` look at, however many ``up`` started."""
    pids = p.root / "pids"
    found = []
    for sp in SERVICE_PROCESSES:
        numbers = {1}
        for pidfile in pids.glob(f"{sp.name}-*.pid"):
            number = pidfile.stem.removeprefix(f"{sp.name}-")
            if number.isdigit() and int(number) > 1:
                numbers.add(int(number))
        found += [ServiceInstance(sp, i) for i in sorted(numbers)]
    return found
