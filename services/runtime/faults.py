"""Fault points for crash tests: exit the process at an exact line.

Enabled only when ``PAYSAGA_FAULT_POINT`` names a point in the environment the process
started with (tests set it for one child process); ``PAYSAGA_FAULT_AFTER=N`` fires on the
N-th time the point is reached.
``os._exit`` skips every cleanup on purpose: it is what a kill -9 or a power cut does.
"""

from __future__ import annotations

import os
import sys

_hits: dict[str, int] = {}
#: read once: a process's fault point is set in its environment when it starts, and
#: ``fault_point`` runs once per handled record
_POINT = os.environ.get("PAYSAGA_FAULT_POINT")
_AFTER = int(os.environ.get("PAYSAGA_FAULT_AFTER", "1"))


def fault_point(name: str) -> None:
    if name != _POINT:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _AFTER:
        print(f"fault point {name} reached: exiting", file=sys.stderr, flush=True)
        os._exit(86)
