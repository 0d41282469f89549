"""The local stack: a real Apache Kafka broker and a real PostgreSQL, no Docker.

Kafka's jars come from Maven Central through ``deploy/local/kafka/pom.xml`` and are
cached in ``.local/kafka/lib-<version>``; the broker runs in KRaft mode as a single
combined broker+controller, or (``PAYSAGA_KAFKA_BROKERS=3``) as a cluster of three
combined nodes (see :func:`kafka_nodes`). Every node also has a SASL_SSL listener
(SCRAM-SHA-512, a throwaway CA made at first start; see :func:`secure_client_env`).
PostgreSQL runs from the machine's binaries in a data
folder under ``.local/<profile>/pg`` (as the unprivileged ``postgres`` user when we
are root; see :func:`pg_home` for a checkout that user cannot enter). Two profiles
keep ``make up`` (dev) and ``make test`` (test) apart: their own ports and folders, so a
test run never disturbs a running stack (``make bench`` has a third, bench).

Every process started here has a pid file; ``down`` stops only processes whose pid file
and command line both say they are ours.

One module per concern, each re-exported here (``from services import devstack``):

- ``profiles.py``  the profiles and their ports, Kafka nodes, service processes and
                   their instances (a second member of a service's consumer groups)
- ``processes.py`` pid files, spawn, stop, ports, waiting until ready
- ``kafka.py``     the broker: jars, nodes, TLS and SCRAM, up and down
- ``postgres.py``  PostgreSQL: its folder, initdb, up and down, the databases
- ``stack.py``     the whole stack and the ``paysaga dev`` commands (up, down, test …)
"""

from services.devstack.kafka import (
    kafka_down,
    kafka_up,
    node_pid,
    node_start,
    secure_client_env,
)
from services.devstack.postgres import ensure_databases, pg_bindir, pg_down, pg_home, pg_up
from services.devstack.processes import pid_running, running_pid, spawn, stop_pid, wait_until
from services.devstack.profiles import (
    PROFILES,
    REPO,
    SERVICE_PROCESSES,
    KafkaNode,
    Profile,
    ServiceInstance,
    ServiceProcess,
    StackError,
    instances_on_disk,
    kafka_nodes,
    service_instances,
)
from services.devstack.stack import (
    answers,
    clean,
    down,
    infra_up,
    run_tests,
    services_down,
    services_up,
    stack_env,
    status,
    up,
)

__all__ = [
    "PROFILES",
    "REPO",
    "SERVICE_PROCESSES",
    "KafkaNode",
    "Profile",
    "ServiceInstance",
    "ServiceProcess",
    "StackError",
    "answers",
    "clean",
    "down",
    "ensure_databases",
    "infra_up",
    "instances_on_disk",
    "kafka_down",
    "kafka_nodes",
    "kafka_up",
    "node_pid",
    "node_start",
    "pg_bindir",
    "pg_down",
    "pg_home",
    "pg_up",
    "pid_running",
    "run_tests",
    "running_pid",
    "secure_client_env",
    "service_instances",
    "services_down",
    "services_up",
    "spawn",
    "stack_env",
    "status",
    "stop_pid",
    "up",
    "wait_until",
]
