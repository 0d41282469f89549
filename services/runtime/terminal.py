"""The console every paysaga command prints through. When the output is not a
terminal (piped to grep, captured by a script), rich would squeeze tables into 80
columns and truncate ids; an operator must always see them whole."""

from __future__ import annotations

import sys

from rich.console import Console


def make_console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=250)
