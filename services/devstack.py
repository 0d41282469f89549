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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import glob
import hashlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / ".local"
KAFKA_POM = REPO / "deploy" / "local" / "kafka" / "pom.xml"
LOG4J_CONFIG = REPO / "deploy" / "local" / "kafka" / "log4j2.properties"


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


def kafka_version() -> str:
    text = KAFKA_POM.read_text()
    return text.split("<kafka.version>")[1].split("</kafka.version>")[0].strip()


# ---------------------------------------------------------------------------- processes


def _log(msg: str) -> None:
    print(f"[devstack] {msg}", file=sys.stderr, flush=True)


def pid_running(pid: int) -> bool:
    """Alive and not a zombie (a dead child we have not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pid_alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline and pid_running(pid)


def running_pid(pidfile: Path, marker: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its command line has ``marker``."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid, marker) else None


def spawn(argv: list[str], log: Path, pidfile: Path, env: Mapping[str, str] | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    pidfile.write_text(str(proc.pid))
    return proc.pid


def stop_pid(pidfile: Path, marker: str, timeout: float = 30.0) -> bool:
    """SIGTERM the process (then SIGKILL after ``timeout``); True if one was running."""
    pid = running_pid(pidfile, marker)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid, marker):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    if _pid_alive(pid, marker):
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return True


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def claim_port(port: int, what: str) -> None:
    """Refuse to start ``what`` where something else already listens: silently using
    another stack's server (another checkout, a system PostgreSQL) would make this one's
    stop/start — and every test that relies on it — act on the wrong process."""
    if port_taken(port):
        raise StackError(
            f"{what}: port {port} is in use by a process this stack did not start "
            f"(another checkout's stack? run its `make down`, or free the port)"
        )


def wait_until(
    what: str, check: Callable[[], bool], alive: Callable[[], bool], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise StackError(f"{what}: the process exited before it became ready")
        if check():
            return
        time.sleep(0.25)
    raise StackError(f"{what}: not ready within {timeout:.0f}s")


# ---------------------------------------------------------------------------- kafka


def kafka_lib() -> Path:
    """Download the broker jars once (Maven), cached per Kafka version."""
    lib = LOCAL / "kafka" / f"lib-{kafka_version()}"
    if (lib / ".complete").exists():
        return lib
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise StackError("Java 17 and Maven are needed to fetch and run Kafka (see README)")
    _log(f"fetching Kafka {kafka_version()} jars with Maven into {lib.relative_to(REPO)}")
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
    _log(f"starting Kafka {kafka_version()} node {node.node_id} on {node.bootstrap}")
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


# ---------------------------------------------------------------------------- postgres


def pg_bindir() -> Path:
    candidates: list[str] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise StackError("PostgreSQL server binaries (initdb, pg_ctl) not found; see README")


#: PostgreSQL refuses to run as root; as root we run it as this user
DB_OWNER = "postgres"
#: where a checkout the DB owner cannot enter keeps its PostgreSQL folders: a system temp
#: folder that survives reboots (unlike /tmp), so the data does too
#: (shared by every user, hence the checks of :func:`_make_pg_home`)
EXTERNAL_PG_BASE = Path("/var/tmp")  # noqa: S108


def _db_owner() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(DB_OWNER)
    except KeyError:
        raise StackError(
            f"PostgreSQL refuses to run as root and there is no '{DB_OWNER}' user to run it"
            f" as: create one (useradd --system {DB_OWNER}), run as an ordinary user, or set"
            " PAYSAGA_DATABASE_URL to an existing server"
        ) from None


def _as_db_owner(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the unprivileged ``postgres`` user.
    Run it from ``/`` (``cwd="/"``): that user may not be able to enter the checkout."""
    if os.geteuid() != 0:
        return argv
    _db_owner()
    return ["runuser", "-u", DB_OWNER, "--", *argv]


def _chown_for_db(path: Path) -> None:
    if os.geteuid() == 0:
        pw = _db_owner()
        for p in [path, *path.rglob("*")]:
            # never through a link: these folders are the DB owner's to write in
            os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)


@functools.cache
def _db_owner_can_enter(path: Path) -> bool:
    """Whether the DB owner can reach ``path`` (search permission on it and on every
    folder above it), asked of the system as that user: modes, ACLs and all."""
    return (
        subprocess.run(
            _as_db_owner(["test", "-x", str(path)]),
            cwd="/",
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )


def external_pg_home(p: Profile) -> Path:
    """The folder outside the checkout for ``p``'s PostgreSQL: named by a hash of the
    checkout's path and the profile, so every command of this checkout (up, down,
    status, clean) finds the same one, and no two checkouts or profiles share one."""
    digest = hashlib.sha256(f"{REPO}\0{p.name}".encode()).hexdigest()[:16]
    return EXTERNAL_PG_BASE / f"paysaga-pg-{p.name}-{digest}"


def pg_home(p: Profile) -> Path:
    """Where ``p``'s PostgreSQL keeps ``data/``, ``run/`` (its socket) and
    ``postgres.log``: ``.local/<profile>/pg`` in the checkout — unless we are root and
    the ``postgres`` user cannot enter the checkout (a clone inside a home folder of mode
    700, a ``mktemp -d`` folder); then :func:`external_pg_home`, mode 700, owned by that
    user. Decided from the checkout's path alone, so it is the same on every call."""
    if os.geteuid() != 0 or _db_owner_can_enter(REPO):
        return p.root / "pg"
    return external_pg_home(p)


def _make_pg_home(p: Profile, home: Path) -> None:
    """Create ``home`` for the DB owner. Outside the checkout it sits in a folder every
    user can write to, so a folder already there must be a real one (not a link), the DB
    owner's, mode 700 — otherwise someone else made it and we stop."""
    if home == p.root / "pg":
        home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # a root umask of 077 would make .local/<profile> a folder the DB owner
            # cannot pass through: let it search (not list) them
            for folder in (LOCAL, p.root):
                folder.chmod(folder.stat().st_mode | stat.S_IXOTH)
        return
    owner = _db_owner()
    if not EXTERNAL_PG_BASE.is_dir():
        raise StackError(
            f"the postgres user cannot enter this checkout ({REPO}) and {EXTERNAL_PG_BASE}"
            " does not exist to keep PostgreSQL's data in: clone it where that user can"
            " enter, or set PAYSAGA_DATABASE_URL to an existing server"
        )
    with contextlib.suppress(FileExistsError):
        os.mkdir(home, 0o700)
        os.chown(home, owner.pw_uid, owner.pw_gid)
    st = home.lstat()
    if not (
        stat.S_ISDIR(st.st_mode) and st.st_uid == owner.pw_uid and stat.S_IMODE(st.st_mode) == 0o700
    ):
        raise StackError(
            f"{home} is not this checkout's PostgreSQL folder (it must be a folder owned by"
            f" {DB_OWNER}, mode 700): remove it, then run again"
        )


def pg_up(p: Profile) -> None:
    home = pg_home(p)
    data, run, log = home / "data", home / "run", home / "postgres.log"
    bindir = pg_bindir()
    if home != p.root / "pg":
        _log(
            f"PostgreSQL data of profile '{p.name}' in {home}: the {DB_OWNER} user cannot"
            f" enter this checkout ({REPO})"
        )
    if not (data / "PG_VERSION").exists():
        _log(f"initdb {_shown(data)}")
        _make_pg_home(p, home)
        run.mkdir(exist_ok=True)
        _chown_for_db(home)
        initdb = subprocess.run(
            _as_db_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "paysaga",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ]
            ),
            cwd="/",
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if initdb.returncode != 0:
            last = initdb.stderr.strip().splitlines()[-1:] or [f"exit {initdb.returncode}"]
            raise StackError(f"initdb of {data} failed: {last[0]}")
    running = (
        subprocess.run(
            _as_db_owner([str(bindir / "pg_ctl"), "-D", str(data), "status"]),
            cwd="/",
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )
    if not running:
        claim_port(p.pg_port, "PostgreSQL")
        _log(f"starting PostgreSQL on 127.0.0.1:{p.pg_port}")
        opts = (
            f"-p {p.pg_port} -c listen_addresses=127.0.0.1 -k {run} "
            "-c max_connections=300 -c shared_buffers=128MB"
        )
        log.touch()
        _chown_for_db(log)
        started = subprocess.run(
            _as_db_owner(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            cwd="/",
            check=False,
            stdout=subprocess.DEVNULL,
        )
        if started.returncode != 0:
            raise StackError(f"PostgreSQL on {p.pg_port} did not start: see {_shown(log)}")
    wait_until(f"PostgreSQL on {p.pg_port}", lambda: _pg_accepts(p), lambda: True, timeout=60)


def _shown(path: Path) -> Path:
    """``path`` as log lines name it: relative inside the checkout, absolute outside."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def ensure_databases(server_url: str, names: tuple[str, ...]) -> None:
    """Create the missing service databases on a server (local or existing)."""
    from services.runtime.service import libpq_conninfo

    with psycopg.connect(
        libpq_conninfo(f"{server_url.rstrip('/')}/postgres"), autocommit=True
    ) as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def _pg_conninfo(p: Profile, dbname: str) -> str:
    return f"host=127.0.0.1 port={p.pg_port} user=paysaga dbname={dbname} connect_timeout=3"


def _pg_accepts(p: Profile) -> bool:
    try:
        with psycopg.connect(_pg_conninfo(p, "postgres")) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def pg_down(p: Profile) -> bool:
    data = pg_home(p) / "data"
    if not (data / "postmaster.pid").exists():
        return False
    subprocess.run(
        _as_db_owner([str(pg_bindir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
        cwd="/",
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return True


def pg_clean(p: Profile) -> None:
    """Stop ``p``'s PostgreSQL and remove its folder outside the checkout, if it has one
    (the one inside goes with ``.local``). A folder there that is not the DB owner's is
    not ours: it is left alone."""
    pg_down(p)
    home = external_pg_home(p)
    if not home.exists():
        return
    st = home.lstat()
    if os.geteuid() == 0 and stat.S_ISDIR(st.st_mode) and st.st_uid == _db_owner().pw_uid:
        shutil.rmtree(home)
        _log(f"removed {home}")
    else:
        _log(f"left {home} alone: not this checkout's PostgreSQL folder")


# ---------------------------------------------------------------------------- the stack


@dataclasses.dataclass(frozen=True)
class ServiceProcess:
    name: str
    module: str
    #: offset from the profile's http_base, except the contract's fixed ports (dev)
    port: int


#: Each service runs as its own process. Contract ports (dev): status API 8080,
#: gateway bridge 8070, gateway simulator 8090; the test profile adds 10000.
SERVICE_PROCESSES: tuple[ServiceProcess, ...] = (
    ServiceProcess("gatewaysim", "services.gatewaysim.app", 8090),
    ServiceProcess("bridge", "services.bridge.app", 8070),
    ServiceProcess("payments", "services.payments.app", 8081),
    ServiceProcess("inventory", "services.inventory.app", 8082),
    ServiceProcess("capture", "services.capture.app", 8083),
    ServiceProcess("refunds", "services.refunds.app", 8084),
    ServiceProcess("orders", "services.orders.app", 8080),
    ServiceProcess("monitor", "services.monitor.app", 8085),
)


def service_port(p: Profile, sp: ServiceProcess) -> int:
    return sp.port + p.service_shift


def stack_env(p: Profile) -> dict[str, str]:
    """Environment for everything the stack runs: explicit PAYSAGA_ settings win."""
    from services.runtime.settings import LOCAL_DEV_GATEWAY_SECRETS

    env = dict(os.environ)
    env.setdefault("PAYSAGA_KAFKA_BOOTSTRAP_SERVERS", p.bootstrap)
    env.setdefault("PAYSAGA_DATABASE_URL", p.database_url)
    if p.brokers > 1:  # topics apply: replicated to all, acknowledged by two
        env.setdefault("PAYSAGA_KAFKA_REPLICATION_FACTOR", str(p.brokers))
        env.setdefault("PAYSAGA_KAFKA_MIN_INSYNC_REPLICAS", "2")
    env.setdefault("PAYSAGA_GATEWAY_SECRETS", LOCAL_DEV_GATEWAY_SECRETS)
    ports = {sp.name: service_port(p, sp) for sp in SERVICE_PROCESSES}
    for name, port in ports.items():
        env.setdefault(f"PAYSAGA_{name.upper()}_PORT", str(port))
    env.setdefault("PAYSAGA_GATEWAY_URL", f"http://127.0.0.1:{ports.get('gatewaysim', 8090)}")
    env.setdefault("PAYSAGA_BRIDGE_URL", f"http://127.0.0.1:{ports.get('bridge', 8070)}")
    env.setdefault("PAYSAGA_STATUS_API_URL", f"http://127.0.0.1:{ports.get('orders', 8080)}")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def infra_up(p: Profile) -> dict[str, str]:
    """Kafka, PostgreSQL (unless explicit servers are configured), topics, migrations."""
    from services.runtime import migrate, topics
    from services.runtime.settings import SERVICES, DatabaseSettings, KafkaSettings

    env = stack_env(p)
    if "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
        kafka_up(p)
    if "PAYSAGA_DATABASE_URL" not in os.environ:
        pg_up(p)
    os.environ.update({k: v for k, v in env.items() if k.startswith("PAYSAGA_")})
    ensure_databases(env["PAYSAGA_DATABASE_URL"], tuple(f"paysaga_{s}" for s in SERVICES))
    kafka = KafkaSettings()
    report = asyncio.run(
        topics.apply(
            kafka.kafka_bootstrap_servers,
            topics.load_specs(
                partitions=kafka.kafka_partitions,
                replication_factor=kafka.kafka_replication_factor,
                min_insync_replicas=kafka.kafka_min_insync_replicas,
            ),
        )
    )
    if report.created:
        _log(f"created {len(report.created)} topics")
    for line in report.drift:
        _log(f"topic drift: {line}")
    db = DatabaseSettings()
    for service in SERVICES:
        if (REPO / "services" / service / "migrations").is_dir():
            migrate.upgrade(service, db.url_for(service))
    return env


def services_up(p: Profile, env: Mapping[str, str]) -> None:
    """Start every service process not already running; wait until each answers."""
    import httpx

    logs = p.root / "logs"
    for sp in SERVICE_PROCESSES:
        pidfile = p.root / "pids" / f"{sp.name}.pid"
        if running_pid(pidfile, f"-m {sp.module}") is not None:
            continue
        claim_port(int(env.get(f"PAYSAGA_{sp.name.upper()}_PORT", service_port(p, sp))), sp.name)
        _log(f"starting {sp.name}")
        pid = spawn([sys.executable, "-m", sp.module], logs / f"{sp.name}.log", pidfile, env)
        url = f"http://127.0.0.1:{service_port(p, sp)}/healthz"

        def answers(url: str = url) -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(sp.name, answers, functools.partial(pid_running, pid), timeout=60)


def services_down(p: Profile) -> None:
    for sp in reversed(SERVICE_PROCESSES):
        if stop_pid(p.root / "pids" / f"{sp.name}.pid", f"-m {sp.module}"):
            _log(f"stopped {sp.name}")


def up(profile: str = "dev") -> None:
    p = PROFILES[profile]
    env = infra_up(p)
    services_up(p, env)
    _log(f"stack '{profile}' is up (logs in {(p.root / 'logs').relative_to(REPO)})")


def down(profile: str = "dev") -> None:
    p = PROFILES[profile]
    services_down(p)
    if kafka_down(p):
        _log("stopped Kafka")
    if pg_down(p):
        _log("stopped PostgreSQL")


def clean() -> None:
    """``make clean``: stop every profile and remove what lives outside the checkout
    (the PostgreSQL folders of :func:`external_pg_home`); ``.local`` is removed after."""
    for name, p in PROFILES.items():
        down(name)
        pg_clean(p)


def status(profile: str = "dev") -> dict[str, str]:
    p = PROFILES[profile]
    home = pg_home(p)
    out = _kafka_status(p)
    out |= {
        "postgresql": ("running" if _pg_accepts(p) else "stopped")
        + ("" if home == p.root / "pg" else f" (data in {home})"),
    }
    for sp in SERVICE_PROCESSES:
        pid = running_pid(p.root / "pids" / f"{sp.name}.pid", f"-m {sp.module}")
        out[sp.name] = f"running (pid {pid}, port {service_port(p, sp)})" if pid else "stopped"
    return out


def _kafka_status(p: Profile) -> dict[str, str]:
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


def run_tests(pytest_args: list[str]) -> int:
    """``make test``: the test profile up, the suite, and the test profile down — always."""
    p = PROFILES["test"]
    started = time.monotonic()
    try:
        env = infra_up(p)
        _log(f"test infrastructure ready in {time.monotonic() - started:.1f}s")
        env["PAYSAGA_TEST_PROFILE"] = p.name
        return subprocess.run(
            [sys.executable, "-m", "pytest", *pytest_args], env=env, cwd=REPO, check=False
        ).returncode
    finally:
        down(p.name)
