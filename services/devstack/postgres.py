"""The local PostgreSQL, from the machine's binaries: where its folder is (inside the
checkout, or outside when we are root and the ``postgres`` user cannot enter it),
``initdb``, starting and stopping it as that user, and the service databases."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import psycopg

from services.devstack.processes import claim_port, say, wait_until
from services.devstack.profiles import LOCAL, REPO, Profile, StackError


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
        say(
            f"PostgreSQL data of profile '{p.name}' in {home}: the {DB_OWNER} user cannot"
            f" enter this checkout ({REPO})"
        )
    if not (data / "PG_VERSION").exists():
        say(f"initdb {_shown(data)}")
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
        say(f"starting PostgreSQL on 127.0.0.1:{p.pg_port}")
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
    wait_until(f"PostgreSQL on {p.pg_port}", lambda: pg_accepts(p), lambda: True, timeout=60)


def _shown(path: Path) -> Path:
    """``path`` as log lines name it: relative inside the checkout, absolute outside."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def ensure_databases(server_url: str, names: tuple[str, ...]) -> None:
    """Create the missing service databases on a server (local or existing)."""
    from services.runtime.settings import database_url_of, libpq_conninfo

    with psycopg.connect(
        libpq_conninfo(database_url_of(server_url, "postgres")), autocommit=True
    ) as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def _pg_conninfo(p: Profile, dbname: str) -> str:
    return f"host=127.0.0.1 port={p.pg_port} user=paysaga dbname={dbname} connect_timeout=3"


def pg_accepts(p: Profile) -> bool:
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
        say(f"removed {home}")
    else:
        say(f"left {home} alone: not this checkout's PostgreSQL folder")
