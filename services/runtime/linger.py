"""How long a consumer's fetches wait at the broker, by how busy the consumer is.

A fetch waits at the broker until ``min_bytes`` are there or ``max_wait_ms`` passed.
Quiet, a record should go on at once: a fetch returns with the first byte. Busy, that
same setting makes every record or two a fetch, a transaction and a relay pass of its
own, and those fixed costs are most of a record's CPU: measured on the saga at 30
orders/s offered, fetches held up to 100 ms took about a quarter less CPU in the five
consuming services and in PostgreSQL, and latency fell, because the two cores queued
less. At 5/s the same wait would add up to 100 ms per hop for nothing.

So the wait follows the consumer's own record rate, read over ``window_s``: above
``above_per_s`` records/s its fetches linger (``linger_min_bytes`` or ``linger_ms``),
at or below it they return at once (the quiet setting). A backlog of at least
``linger_min_bytes`` is not held: the fetch finds the bytes waiting.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class FetchWait:
    """A fetch's wait at the broker: until ``min_bytes`` are there, or ``max_wait_ms``."""

    min_bytes: int
    max_wait_ms: int


@dataclasses.dataclass
class Linger:
    """Chooses the fetch wait from the records a consumer polled (``polled``)."""

    quiet: FetchWait
    busy: FetchWait
    #: records/s over a window above which the consumer is busy (0: it never lingers)
    above_per_s: float
    window_s: float = 1.0
    #: False: the consumer's fetch wait cannot be set (``settable``), it never lingers
    enabled: bool = True
    lingering: bool = False
    _since: float | None = None
    _records: int = 0

    def reset(self, *, enabled: bool = True) -> None:
        """A new consumer, built with the quiet wait; ``enabled=False``: it never lingers."""
        self.lingering, self._since, self._records = False, None, 0
        self.enabled = enabled

    def polled(self, now: float, records: int) -> FetchWait | None:
        """Note a poll's ``records`` at ``now`` (monotonic seconds); the wait to use
        from now on when it changes, else None. Decided once per window, on the rate
        over it; a window with no poll (a long wait) counts as quiet. Not smoothed: a
        burst of a second above the rate lingers for the next second."""
        if self._since is None:  # the first poll opens the window: what it brought
            self._since = now  # had waited for however long, so it is not counted
            return None
        self._records += records
        elapsed = now - self._since
        if elapsed < self.window_s:
            return None
        busy = self.enabled and self.above_per_s > 0 and self._records / elapsed > self.above_per_s
        self._since, self._records = now, 0
        if busy == self.lingering:
            return None
        self.lingering = busy
        return self.busy if busy else self.quiet


#: where aiokafka (0.12 to 0.14) keeps the two values it reads for each fetch request
#: it builds; it takes them at construction only
_FETCHER_FIELDS = ("_fetch_min_bytes", "_fetch_max_wait_ms")


def settable(consumer: Any) -> bool:
    """Whether ``consumer``'s fetch wait can be set while it runs (``apply``): False on
    an aiokafka that keeps it elsewhere. Then the consumer keeps its quiet wait, as it
    did before lingering existed (``tests/integration/test_fetch_linger.py`` runs
    ``apply`` against the real broker)."""
    fetcher = getattr(consumer, "_fetcher", None)
    return all(isinstance(getattr(fetcher, name, None), int) for name in _FETCHER_FIELDS)


def apply(consumer: Any, wait: FetchWait) -> None:
    """Set the wait of ``consumer``'s next fetch requests (``settable`` first)."""
    fetcher = consumer._fetcher
    fetcher._fetch_min_bytes = wait.min_bytes
    fetcher._fetch_max_wait_ms = wait.max_wait_ms
