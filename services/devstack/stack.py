"""The whole stack of a profile: its environment, the infrastructure (Kafka,
PostgreSQL, topics, migrations), the service processes, and the ``paysaga dev``
commands (up, down, status, clean, test)."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time
from collections.abc import Mapping

from services.devstack.kafka import kafka_down, kafka_status, kafka_up
from services.devstack.postgres import (
    ensure_databases,
    pg_accepts,
    pg_clean,
    pg_down,
    pg_home,
    pg_up,
)
from services.devstack.processes import (
    claim_port,
    pid_running,
    running_pid,
    say,
    spawn,
    stop_pid,
    wait_until,
)
from services.devstack.profiles import (
    PROFILES,
    REPO,
    SERVICE_PROCESSES,
    Profile,
    instances_on_disk,
    service_instances,
    service_port,
)


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
        say(f"created {len(report.created)} topics")
    for line in report.drift:
        say(f"topic drift: {line}")
    db = DatabaseSettings()
    for service in SERVICES:
        if (REPO / "services" / service / "migrations").is_dir():
            migrate.upgrade(service, db.url_for(service))
    return env


def services_up(p: Profile, env: Mapping[str, str], instances: int = 1) -> None:
    """Start every service process not already running — ``instances`` of each service
    that scales out (``ServiceInstance``: own port, pid file and log) — and wait until
    each answers."""
    for inst in service_instances(instances):
        if running_pid(inst.pidfile(p), inst.marker) is not None:
            continue
        var = f"PAYSAGA_{inst.service.name.upper()}_PORT"
        port = inst.port(int(env.get(var, service_port(p, inst.service))))
        claim_port(port, inst.name)
        say(f"starting {inst.name}")
        pid = spawn(
            [sys.executable, "-m", inst.service.module],
            inst.log(p),
            inst.pidfile(p),
            {**env, var: str(port)},
        )
        url = f"http://127.0.0.1:{port}/healthz"
        wait_until(
            inst.name, functools.partial(answers, url), functools.partial(pid_running, pid), 60
        )


def answers(url: str) -> bool:
    """``url`` answers 200 (a service's ``/healthz`` or ``/readyz``)."""
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def services_down(p: Profile) -> None:
    """Stop every instance of every service (however many were started)."""
    for inst in reversed(instances_on_disk(p)):
        if stop_pid(inst.pidfile(p), inst.marker):
            say(f"stopped {inst.name}")


def up(profile: str = "dev") -> None:
    p = PROFILES[profile]
    env = infra_up(p)
    services_up(p, env)
    say(f"stack '{profile}' is up (logs in {(p.root / 'logs').relative_to(REPO)})")


def down(profile: str = "dev") -> None:
    p = PROFILES[profile]
    services_down(p)
    if kafka_down(p):
        say("stopped Kafka")
    if pg_down(p):
        say("stopped PostgreSQL")


def clean() -> None:
    """``make clean``: stop every profile and remove what lives outside the checkout
    (the PostgreSQL folders of :func:`external_pg_home`); ``.local`` is removed after."""
    for name, p in PROFILES.items():
        down(name)
        pg_clean(p)


def status(profile: str = "dev") -> dict[str, str]:
    p = PROFILES[profile]
    home = pg_home(p)
    out = kafka_status(p)
    out |= {
        "postgresql": ("running" if pg_accepts(p) else "stopped")
        + ("" if home == p.root / "pg" else f" (data in {home})"),
    }
    for inst in instances_on_disk(p):
        pid = running_pid(inst.pidfile(p), inst.marker)
        port = inst.port(service_port(p, inst.service))
        if pid or inst.number == 1:
            out[inst.name] = f"running (pid {pid}, port {port})" if pid else "stopped"
    return out


def run_tests(pytest_args: list[str]) -> int:
    """``make test``: the test profile up, the suite, and the test profile down — always."""
    p = PROFILES["test"]
    started = time.monotonic()
    try:
        env = infra_up(p)
        say(f"test infrastructure ready in {time.monotonic() - started:.1f}s")
        env["PAYSAGA_TEST_PROFILE"] = p.name
        return subprocess.run(
            [sys.executable, "-m", "pytest", *pytest_args], env=env, cwd=REPO, check=False
        ).returncode
    finally:
        down(p.name)
