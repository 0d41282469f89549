"""The processes the stack starts: pid files, spawning, stopping only what is ours
(pid file and command line both agree), ports, and waiting until a process is ready."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from services.devstack.profiles import REPO, StackError


def say(msg: str) -> None:
    """One line of progress on stderr."""
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
