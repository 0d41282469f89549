"""Alembic, one migration history per service, driven from code (no alembic.ini).

Each service keeps ``services/<service>/migrations`` whose ``env.py`` calls
:func:`run_env`. ``paysaga migrate`` upgrades every service database to head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, create_engine, pool

SERVICES_DIR = Path(__file__).resolve().parents[1]


def alembic_config(service: str, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SERVICES_DIR / service / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(service: str, url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(service, url), revision)


def run_env() -> None:
    """Body of every service's ``migrations/env.py`` (online mode only)."""
    from alembic import context

    url = context.config.get_main_option("sqlalchemy.url")
    assert url is not None
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def create_initial(op: Any, service_metadata: MetaData) -> None:
    """The first migration of every service: the runtime's tables (inbox, positions,
    outbox, dead letters, parked) and the service's own tables as first released.
    Later changes are explicit ``op.*`` migrations on top."""
    from services.runtime.tables import metadata as runtime_metadata

    bind = op.get_bind()
    runtime_metadata.create_all(bind)
    service_metadata.create_all(bind)
