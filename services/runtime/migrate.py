"""Alembic, one migration history per service, driven from code (no alembic.ini).

Each service keeps ``services/<service>/migrations`` whose ``env.py`` calls
:func:`run_env`. ``paysaga migrate`` upgrades every service database to head.
Migrations are explicit, frozen DDL (the runtime's tables: ``migrations.runtime_0001``).
After changing a model, write the next migration with :func:`revision` (Alembic's
autogenerate against a database at head, then read and adjust it); the migration tests
fail while a migrated database differs from ``target_metadata``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

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


def revision(service: str, url: str, message: str) -> None:
    """Write the service's next migration: what the database at ``url`` lacks."""
    command.revision(alembic_config(service, url), message=message, autogenerate=True)


def target_metadata(service: str) -> list[MetaData]:
    """What a service database holds at head: the runtime's tables and its own."""
    from services.runtime.tables import metadata as runtime_metadata

    store = importlib.import_module(f"services.{service}.store")
    return [runtime_metadata, store.metadata]


def run_env() -> None:
    """Body of every service's ``migrations/env.py`` (online mode only)."""
    from alembic import context

    url = context.config.get_main_option("sqlalchemy.url")
    location = context.config.get_main_option("script_location")
    assert url is not None
    assert location is not None
    service = Path(location).parent.name
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(
            connection=conn,
            target_metadata=target_metadata(service),
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
