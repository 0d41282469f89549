"""A service's decisions are pure: ``services/*/domain.py`` (and the payment request's
``services/payments/requests.py``) import nothing that does I/O — not directly, not
through another ``services`` module. ``services.runtime.retry`` is the one runtime
module they may use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_LIBRARIES = frozenset(
    {"aiokafka", "sqlalchemy", "psycopg", "fastapi", "httpx", "faust", "uvicorn"}
)
ALLOWED_RUNTIME = frozenset({"services.runtime.retry"})
PURE = sorted(
    [*(ROOT / "services").glob("*/domain.py"), ROOT / "services" / "payments" / "requests.py"]
)


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _source(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _impurities(path: Path) -> list[str]:
    """What ``path`` reaches that does I/O, each as ``via -> module``."""
    seen: set[Path] = set()
    bad: list[str] = []
    todo: list[tuple[Path, str]] = [(path, path.relative_to(ROOT).as_posix())]
    while todo:
        current, via = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for module in sorted(_imports(current)):
            top = module.split(".")[0]
            if top in IO_LIBRARIES:
                bad.append(f"{via} -> {module}")
            elif module.startswith("services.runtime.") and module not in ALLOWED_RUNTIME:
                if _source(module) is not None:  # a name imported from a module is no module
                    bad.append(f"{via} -> {module}")
            elif top in {"services", "schemas"} and (src := _source(module)) is not None:
                todo.append((src, f"{via} -> {module}"))
    return bad


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_domain_imports_no_io(path: Path) -> None:
    assert _impurities(path) == []


def test_the_check_sees_through_services_imports() -> None:
    """The check itself: an I/O import two modules away is found."""
    assert _impurities(ROOT / "services" / "runtime" / "consumer.py")
    assert not _impurities(ROOT / "services" / "runtime" / "retry.py")
