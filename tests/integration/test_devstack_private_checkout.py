"""A checkout inside a folder other users cannot enter (a home folder of mode 700, a
``mktemp -d`` one), run as root: PostgreSQL runs as the unprivileged ``postgres`` user,
so its data folder must live where that user can reach it — and every later command
(down, clean, up again) must find it there."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from services import devstack
from tests.support.harness import REPO, free_port, wait_for

pytestmark = pytest.mark.integration


def _accepts(port: int) -> bool:
    try:
        with psycopg.connect(
            f"host=127.0.0.1 port={port} user=paysaga dbname=postgres connect_timeout=3"
        ) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def _clone(into: Path) -> Path:
    """A fresh clone of this checkout's HEAD, with its uncommitted changes (and new
    files) on top, so the test runs the code under test."""
    clone = into / "paysaga"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, check=True
        ).stdout

    if diff := git("diff", "HEAD", "--binary"):
        subprocess.run(["git", "-C", str(clone), "apply", "-"], input=diff, check=True)
    for name in git("ls-files", "--others", "--exclude-standard", "-z").decode().split("\0"):
        if name:
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    return clone


def test_root_checkout_in_private_folder_starts_postgresql(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs PostgreSQL as another user")
    try:
        devstack.pg_bindir()
    except devstack.StackError:
        pytest.skip("no PostgreSQL server binaries")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    clone = _clone(private)
    port = free_port()
    # the clone's own test profile, on a free port: its code, its folders
    env = {**os.environ, "PAYSAGA_TEST_PORT_SHIFT": str(port - 55433)}

    def in_clone(code: str) -> subprocess.CompletedProcess[str]:
        prelude = "from services import devstack; p = devstack.PROFILES['test']; "
        return subprocess.run(
            [sys.executable, "-c", prelude + code],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    home: Path | None = None
    try:
        up = in_clone(f"assert str(devstack.REPO) == {str(clone)!r}; devstack.pg_up(p)")
        assert up.returncode == 0, up.stderr
        assert _accepts(port)
        where = in_clone("print(devstack.pg_home(p))")
        assert where.returncode == 0, where.stderr
        home = Path(where.stdout.strip())
        # outside the private folder, said in a log line, private to the postgres user
        assert not home.is_relative_to(private)
        assert str(home) in up.stderr
        st = home.lstat()
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == pwd.getpwnam("postgres").pw_uid
        assert (home / "data" / "PG_VERSION").exists()

        again = in_clone("devstack.pg_up(p)")  # found again: no second initdb, no clash
        assert again.returncode == 0, again.stderr
        assert "initdb" not in again.stderr

        down = in_clone("assert devstack.pg_down(p)")
        assert down.returncode == 0, down.stderr
        wait_for(lambda: not _accepts(port), timeout=30, what="PostgreSQL stopped")

        # `make clean` removes the folder outside the checkout too
        clean = subprocess.run(
            [sys.executable, "-m", "services.cli", "dev", "clean"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert not home.exists()
    finally:
        if _accepts(port):
            in_clone("devstack.pg_down(p)")
        if home is not None and home.exists():
            shutil.rmtree(home)
        shutil.rmtree(private, ignore_errors=True)
