"""The local Kafka: its jars (Maven, cached per version), each node's
``server.properties`` with its PLAINTEXT, CONTROLLER and SASL_SSL listeners, the
throwaway CA and broker certificate, the SCRAM user, and starting, probing and stopping
the nodes (one, or a cluster of three: see :func:`~services.devstack.profiles.kafka_nodes`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import shutil
import subprocess
from pathlib import Path

from services.devstack.processes import (
    claim_port,
    pid_running,
    running_pid,
    say,
    spawn,
    stop_pid,
    wait_until,
)
from services.devstack.profiles import LOCAL, REPO, KafkaNode, Profile, StackError, kafka_nodes

KAFKA_POM = REPO / "deploy" / "local" / "kafka" / "pom.xml"
LOG4J_CONFIG = REPO / "deploy" / "local" / "kafka" / "log4j2.properties"


def kafka_version() -> str:
    text = KAFKA_POM.read_text()
    return text.split("<kafka.version>")[1].split("</kafka.version>")[0].strip()


def kafka_lib() -> Path:
    """Download the broker jars once (Maven), cached per Kafka version."""
    lib = LOCAL / "kafka" / f"lib-{kafka_version()}"
    if (lib / ".complete").exists():
        return lib
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise StackError("Java 17 and Maven are needed to fetch and run Kafka (see README)")
    say(f"fetching Kafka {kafka_version()} jars with Maven into {lib.relative_to(REPO)}")
    lib.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(KAFKA_POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={lib}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if fetched.returncode != 0:
        raise StackError(f"Maven could not fetch the Kafka jars:\n{fetched.stdout[-3000:]}")
    (lib / ".complete").touch()
    return lib


#: the local SASL_SSL listener's SCRAM user: a documented development credential, like
#: the local gateway secret — nothing outside the local stack uses it
LOCAL_KAFKA_USER = "paysaga"
LOCAL_KAFKA_PASSWORD = "paysaga-local-dev"  # noqa: S105


def secure_client_env(p: Profile) -> dict[str, str]:
    """The settings a client needs to connect through the nodes' SASL_SSL listener."""
    return {
        "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": p.secure_bootstrap,
        "PAYSAGA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "PAYSAGA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "PAYSAGA_KAFKA_SASL_USERNAME": LOCAL_KAFKA_USER,
        "PAYSAGA_KAFKA_SASL_PASSWORD": LOCAL_KAFKA_PASSWORD,
        "PAYSAGA_KAFKA_SSL_CAFILE": str(_tls_dir(p) / "ca.pem"),
    }


def _tls_dir(p: Profile) -> Path:
    return p.root / "kafka" / "tls"


def _make_tls(p: Profile) -> Path:
    """A throwaway CA and one broker certificate (127.0.0.1 and localhost) for the
    profile's nodes, made once per profile with ``openssl``; returns the PEM keystore
    (key + certificate chain) the brokers read (``ssl.keystore.type=PEM``)."""
    tls = _tls_dir(p)
    keystore = tls / "broker-keystore.pem"
    if keystore.exists():
        return keystore
    if shutil.which("openssl") is None:
        raise StackError("openssl is needed to make the local broker's TLS certificate")
    tls.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert, ext = (tls / n for n in ("ca.key", "ca.pem", "broker.key",
                                        "broker.csr", "broker.pem", "broker.ext"))  # fmt: skip
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    steps = [
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "3650",
         "-subj", f"/CN=paysaga local CA ({p.name})"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "3650", "-extfile", ext],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run(
            ["openssl", *map(str, step)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise StackError(f"openssl {step[0]} failed: {done.stderr.strip()[-300:]}")
    keystore.write_text(key.read_text() + cert.read_text() + ca.read_text())
    keystore.chmod(0o600)
    return keystore


def _kafka_properties(p: Profile, node: KafkaNode, keystore: Path) -> str:
    nodes = kafka_nodes(p)
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    replicas, min_isr = len(nodes), min(2, len(nodes))
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={node.node_id}",
            f"controller.quorum.voters={voters}",
            f"listeners=PLAINTEXT://127.0.0.1:{node.port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port},"
            f"SASL_SSL://127.0.0.1:{node.secure_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{node.port},"
            f"SASL_SSL://127.0.0.1:{node.secure_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
            "SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms=SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={keystore}",
            f"log.dirs={node.home / 'data'}",
            "num.partitions=1",
            # internal topics replicated like the saga's: a node lost loses no offsets
            # or transaction state (paysaga's topics get theirs from `topics apply`);
            # the broker-wide min.insync.replicas stays 1 for topics made with RF 1
            f"offsets.topic.replication.factor={replicas}",
            "offsets.topic.num.partitions=6",
            f"transaction.state.log.replication.factor={replicas}",
            f"transaction.state.log.min.isr={min_isr}",
            f"share.coordinator.state.topic.replication.factor={replicas}",
            f"share.coordinator.state.topic.min.isr={min_isr}",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "",
        ]
    )


def _cluster_id(p: Profile) -> str:
    """One id for all of the profile's nodes (each is formatted on its own), kept so a
    node whose folder is new joins the others."""
    path = p.root / "kafka" / f"cluster-id-{p.brokers}"
    if path.exists():
        return path.read_text().strip()
    # URL-safe base64 of 16 random bytes, as StorageTool random-uuid makes; a leading
    # '-' would be read as an option, so draw again.
    cluster_id = "-"
    while cluster_id.startswith("-"):
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()[:22]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cluster_id)
    return cluster_id


def node_pid(node: KafkaNode) -> int | None:
    return running_pid(node.pidfile, str(node.properties))


def node_start(p: Profile, node: KafkaNode) -> int:
    """Start one node unless it runs (formatting its folder the first time); its pid.
    Does not wait: a node of a cluster is ready only with a majority of the others."""
    pid = node_pid(node)
    if pid is not None:
        return pid
    for port, what in ((node.port, "Kafka"), (node.controller_port, "Kafka controller"),
                       (node.secure_port, "Kafka SASL_SSL listener")):  # fmt: skip
        claim_port(port, what)
    lib = kafka_lib()
    classpath = f"{lib}/*"
    node.home.mkdir(parents=True, exist_ok=True)
    node.properties.write_text(_kafka_properties(p, node, _make_tls(p)))
    if not (node.home / "data" / "meta.properties").exists():
        subprocess.run(
            ["java", "-cp", classpath, f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
             "kafka.tools.StorageTool", "format", "-t", _cluster_id(p), "-c", str(node.properties)],
            check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    say(f"starting Kafka {kafka_version()} node {node.node_id} on {node.bootstrap}")
    return spawn(
        ["java", "-Xms512m", "-Xmx512m", "-XX:+UseG1GC",
         f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={node.home}",
         "-cp", classpath, "kafka.Kafka", str(node.properties)],
        node.home / "kafka.log",
        node.pidfile,
    )  # fmt: skip


def kafka_up(p: Profile) -> None:
    if p.brokers not in (1, 3):
        raise StackError(f"PAYSAGA_KAFKA_BROKERS={p.brokers}: the local stack runs 1 or 3")
    other = [n for n in kafka_nodes(p, 4 - p.brokers) if node_pid(n) is not None]
    if other:
        raise StackError(
            f"profile '{p.name}' runs {len(kafka_nodes(p, 4 - p.brokers))} Kafka node(s), not"
            f" {p.brokers}: run `make down` first (or set PAYSAGA_KAFKA_BROKERS to match)"
        )
    pids = [node_start(p, node) for node in kafka_nodes(p)]
    wait_until(
        f"Kafka on {p.bootstrap}",
        lambda: asyncio.run(_kafka_ready(p.bootstrap, p.brokers)),
        lambda: all(pid_running(pid) for pid in pids),
        timeout=180,
    )
    _ensure_scram_user(p)


def _ensure_scram_user(p: Profile) -> None:
    """The SASL_SSL listener's SCRAM user, created once per cluster with Kafka's own
    tool (``kafka-configs --alter --add-config SCRAM-SHA-512=...``)."""
    node = kafka_nodes(p)[0]
    marker = node.home / "data" / ".paysaga-scram-user"
    if marker.exists():
        return
    done = subprocess.run(
        ["java", "-cp", f"{kafka_lib()}/*", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
         "kafka.admin.ConfigCommand", "--bootstrap-server", p.bootstrap, "--alter",
         "--add-config", f"SCRAM-SHA-512=[iterations=8192,password={LOCAL_KAFKA_PASSWORD}]",
         "--entity-type", "users", "--entity-name", LOCAL_KAFKA_USER],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise StackError(f"could not create the local SCRAM user: {done.stderr.strip()[-300:]}")
    marker.touch()


async def _kafka_ready(bootstrap: str, brokers: int = 1) -> bool:
    """Real readiness: the admin client sees every broker and a controller, and a probe
    topic replicated to all of them has a leader and a full ISR on every partition."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError

    from services.runtime.kafka import client_options

    admin = AIOKafkaAdminClient(**client_options(bootstrap), request_timeout_ms=3000)
    # "connection refused" until the broker listens is the expected answer, not news
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        await asyncio.wait_for(admin.start(), 5)
        cluster = await admin.describe_cluster()
        if len(cluster.get("brokers") or []) < brokers or cluster.get("controller_id", -1) < 0:
            return False
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic("paysaga.probe", 1, brokers)])
        described = await admin.describe_topics(["paysaga.probe"])
        parts = described[0].get("partitions", []) if described else []
        return bool(parts) and all(
            part.get("leader", -1) >= 0 and len(part.get("isr", [])) >= brokers for part in parts
        )
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        logging.getLogger("aiokafka").setLevel(logging.NOTSET)
        with contextlib.suppress(Exception):
            await admin.close()


def kafka_down(p: Profile) -> bool:
    """Stop every Kafka node of the profile, one node or three, whatever
    ``PAYSAGA_KAFKA_BROKERS`` says now."""
    stopped = False
    for node in [*kafka_nodes(p, 1), *kafka_nodes(p, 3)]:
        stopped |= stop_pid(node.pidfile, str(node.properties), timeout=60)
    return stopped


def kafka_status(p: Profile) -> dict[str, str]:
    """One line per Kafka node, of the layout that runs (else of the configured one)."""
    nodes = next(
        (ns for ns in (kafka_nodes(p, 1), kafka_nodes(p, 3)) if any(map(node_pid, ns))),
        kafka_nodes(p),
    )
    out = {}
    for node in nodes:
        name = "kafka" if len(nodes) == 1 else f"kafka-{node.node_id}"
        pid = node_pid(node)
        out[name] = (
            f"running (pid {pid}, port {node.port}, SASL_SSL {node.secure_port})"
            if pid
            else "stopped"
        )
    return out
