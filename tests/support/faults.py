"""Faults for tests of the whole stack, on one machine, without Docker or netem.

``Stack`` drives the test profile's processes (services/devstack/processes.py: pid
files per service): start, stop, ``kill -9``, SIGSTOP/SIGCONT any service, a second instance of
one (a consumer group of two members), the Kafka broker and PostgreSQL; a service can
be started with a fault point armed (services/runtime/faults.py) or with its gateway,
database or other setting pointed elsewhere (a :class:`~tests.support.tcp_proxy.TcpProxy`).
Every fault is counted in ``injected`` so a scenario can report what it did.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services import devstack
from services.devclient import wait_for
from tests.support.harness import free_port

PROFILE = devstack.PROFILES["test"]
BY_NAME = {sp.name: sp for sp in devstack.SERVICE_PROCESSES}
#: the services of the saga proper (the simulator's ledger lives in memory: killing it
#: forgets what the gateway holds, which is no fault of paysaga's)
SAGA_SERVICES = ("bridge", "payments", "inventory", "capture", "refunds", "orders")
#: exit status of a process stopped by a fault point
FAULT_EXIT = 86


@dataclasses.dataclass
class Stack:
    """The test profile's processes, with ``env`` as every service's environment."""

    env: dict[str, str]
    profile: devstack.Profile = PROFILE
    injected: Counter[str] = dataclasses.field(default_factory=Counter)
    _ports: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    #: armed process -> its fault point and where its log started
    _armed: dict[int, tuple[str, int]] = dataclasses.field(default_factory=dict)

    # ---------------------------------------------------------------- processes
    def pidfile(self, name: str, instance: int = 1) -> Path:
        return devstack.ServiceInstance(BY_NAME[name], instance).pidfile(self.profile)

    def log(self, name: str, instance: int = 1) -> Path:
        return devstack.ServiceInstance(BY_NAME[name], instance).log(self.profile)

    def pid(self, name: str, instance: int = 1) -> int | None:
        return devstack.running_pid(self.pidfile(name, instance), f"-m {BY_NAME[name].module}")

    def port(self, name: str, instance: int = 1) -> int:
        if instance == 1:
            return int(self.env[f"PAYSAGA_{name.upper()}_PORT"])
        return self._ports.setdefault((name, instance), free_port())

    def start(self, name: str, instance: int = 1, *, wait: bool = True, **overrides: str) -> int:
        """Start ``name`` (its ``instance``-th process: another member of its consumer
        groups, on its own port) with ``overrides`` added to its environment; wait until
        it answers ``/healthz`` unless ``wait`` is false (a fault point may end it first)."""
        sp = BY_NAME[name]
        env = {
            **self.env,
            **overrides,
            f"PAYSAGA_{name.upper()}_PORT": str(self.port(name, instance)),
        }
        pid = devstack.spawn(
            [sys.executable, "-m", sp.module],
            self.log(name, instance),
            self.pidfile(name, instance),
            env,
        )
        if wait:
            self.wait_healthy(name, instance, pid)
        return pid

    def wait_healthy(self, name: str, instance: int = 1, pid: int | None = None) -> None:
        url = f"http://127.0.0.1:{self.port(name, instance)}/healthz"
        alive = functools.partial(devstack.pid_running, pid or self.pid(name, instance) or -1)
        devstack.wait_until(name, functools.partial(devstack.answers, url), alive, timeout=90)

    def stop(self, name: str, instance: int = 1) -> None:
        """SIGTERM, as a deployment does (graceful)."""
        devstack.stop_pid(self.pidfile(name, instance), f"-m {BY_NAME[name].module}")

    def kill9(self, name: str, instance: int = 1) -> None:
        pid = self.pid(name, instance)
        assert pid is not None, f"{name} is not running"
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: not devstack.pid_running(pid) or _reap(pid), timeout=10, what=f"{name} dead"
        )
        self.injected["kill -9"] += 1

    def restart(self, name: str, instance: int = 1, **overrides: str) -> int:
        self.stop(name, instance)
        return self.start(name, instance, **overrides)

    def pause(self, name: str, instance: int = 1) -> None:
        pid = self.pid(name, instance)
        assert pid is not None, f"{name} is not running"
        os.kill(pid, signal.SIGSTOP)
        self.injected["SIGSTOP"] += 1

    def resume(self, name: str, instance: int = 1) -> None:
        pid = self.pid(name, instance)
        assert pid is not None, f"{name} is not running"
        os.kill(pid, signal.SIGCONT)

    @contextmanager
    def paused(self, name: str, instance: int = 1) -> Iterator[None]:
        self.pause(name, instance)
        try:
            yield
        finally:
            self.resume(name, instance)

    def armed(self, name: str, point: str, after: int = 1, **overrides: str) -> int:
        """Restart ``name`` with fault point ``point`` armed to fire on its ``after``-th
        passage (the process then exits as under kill -9); returns its pid."""
        self.stop(name)
        env = {"PAYSAGA_FAULT_POINT": point, "PAYSAGA_FAULT_AFTER": str(after), **overrides}
        log = self.log(name)
        offset = log.stat().st_size if log.exists() else 0
        pid = self.start(name, wait=False, **env)
        self._armed[pid] = (point, offset)
        return pid

    def fired(self, name: str, pid: int) -> bool:
        """Whether the armed process ``pid`` has exited at its fault point (its log says
        so: the exit status may already be gone, reaped by ``subprocess`` when it starts
        another process); any other end of it fails the test, with its log."""
        if devstack.pid_running(pid) and not _reap(pid):
            return False
        point, offset = self._armed.pop(pid)
        with self.log(name).open("rb") as f:
            f.seek(offset)
            since = f.read().decode(errors="replace")
        assert f"fault point {point} reached" in since, (
            f"{name} ({pid}) ended, not at {point}:\n{since[-3000:]}"
        )
        self.injected["fault point"] += 1
        return True

    def up(self, **overrides: str) -> None:
        """Every saga process running (started with ``overrides`` where it was not)."""
        for sp in devstack.SERVICE_PROCESSES:
            if self.pid(sp.name) is None:
                self.start(sp.name, **overrides)

    def down(self) -> None:
        devstack.services_down(self.profile)  # every instance, the extra ones too

    # ---------------------------------------------------------------- infrastructure
    def kafka_pid(self) -> int | None:
        home = self.profile.root / "kafka"
        return devstack.running_pid(home / "kafka.pid", str(home / "server.properties"))

    def restart_kafka(self, down_s: float = 0.0, *, hard: bool = False) -> None:
        """Stop the broker (SIGTERM, or kill -9 when ``hard``), keep it down ``down_s``,
        start it again and wait until it serves."""
        if hard:
            pid = self.kafka_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda: not devstack.pid_running(pid) or _reap(pid), timeout=30, what="broker dead"
            )
        else:
            devstack.kafka_down(self.profile)
        _hold(down_s)
        devstack.kafka_up(self.profile)
        self.injected["broker restart"] += 1

    def restart_postgres(self, down_s: float = 0.0) -> None:
        devstack.pg_down(self.profile)
        _hold(down_s)
        devstack.pg_up(self.profile)
        self.injected["PostgreSQL restart"] += 1

    def owns_infrastructure(self) -> bool:
        """Whether this run uses the test profile's own broker and PostgreSQL (not
        servers named by settings, which a test must not stop)."""
        return (
            self.env.get("PAYSAGA_KAFKA_BOOTSTRAP_SERVERS") == self.profile.bootstrap
            and self.env.get("PAYSAGA_DATABASE_URL", "").rstrip("/") == self.profile.database_url
            and self.kafka_pid() is not None
        )


def _hold(seconds: float) -> None:
    """An outage's length: the one place a chaos test waits on the clock on purpose."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)


def _reap(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True  # not our child: gone once pid_running says so
    return done == pid


__all__ = ["FAULT_EXIT", "PROFILE", "SAGA_SERVICES", "Stack"]
