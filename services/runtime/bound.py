"""Statements built once: their values are bound parameters, so each execution only
binds them — building a statement and its cache key per record cost the client about
as much CPU as executing it (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table, bindparam


def bound(table: Table, names: Iterable[str], prefix: str) -> dict[Any, Any]:
    """``table``'s columns ``names``, each set from the bound parameter ``prefix`` +
    its name (``prefixed`` gives the parameters). A prefix, because SQLAlchemy keeps a
    column's own name for the values it binds itself."""
    return {table.c[n]: bindparam(prefix + n, type_=table.c[n].type) for n in names}


def prefixed(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` as the parameters of a statement built with ``bound``."""
    return {prefix + k: v for k, v in values.items()}
