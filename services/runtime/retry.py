"""The pure retry rules: how long to wait before trying again, and how a round whose
outcome is not known ends. No I/O, no clock, no randomness: callers pass ``now`` and
``jitter`` (a number in [0, 1)).

This is the one runtime module a service's ``domain.py`` may import (a unit test,
``tests/unit/test_domain_purity.py``, checks it); everything else in
``services.runtime`` does I/O.

* ``backoff_s``: the one backoff rule — exponential, capped, jittered — used by the
  consumer's retries, the gateway client, the intent workers, the work loops, the
  bridge's reconnects and the gateway simulator's webhook deliveries.
* ``RetryPolicy`` / ``retry_later``: a gateway intent's rounds. An unknown outcome is
  never final: once the rounds are spent the alarm is raised once (``Stalled``) and the
  intent is still looked up, at a capped interval, until the gateway's answer settles
  it.
* ``Lookup`` / ``Call``: a round's next step at the gateway, as a domain names it;
  ``GatewayOutcome``: what a mutating gateway call answered, which the domains decide
  on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

__all__ = [
    "Call",
    "Failed",
    "GatewayOutcome",
    "Lookup",
    "OutcomeKind",
    "Retry",
    "RetryPolicy",
    "Round",
    "Stalled",
    "backoff_s",
    "retry_later",
]

#: beyond this the exponent only overflows: every cap in use is reached long before
_MAX_EXPONENT = 62


def backoff_s(
    attempt: int, base_s: float, max_s: float, jitter: float, fixed: float = 0.5
) -> float:
    """The wait before retry ``attempt`` (1-based): ``base_s * 2**(attempt - 1)``, capped
    at ``max_s``. Of that ceiling the share ``fixed`` is always waited and the rest
    scaled by ``jitter``: 0.5 is "equal jitter" (retries spread out but never come at
    once), 0 "full jitter" (anywhere up to the ceiling), 1 no jitter at all."""
    exponent = min(max(0, attempt - 1), _MAX_EXPONENT)
    ceiling = min(max_s, base_s * 2.0**exponent)
    return ceiling * fixed + jitter * ceiling * (1 - fixed)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    max_s: float
    #: backoff cap of the look-ups that go on after the ``max_attempts`` rounds
    stalled_max_s: float = 900.0

    def delay_s(self, attempt: int, jitter: float) -> float:
        """Before round ``attempt + 1``: ``backoff_s`` with equal jitter."""
        return backoff_s(attempt, self.base_s, self.max_s, jitter)


@dataclass(frozen=True, slots=True)
class Failed:
    """Automatic handling is over; ``reason`` is a snake_case code."""

    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """Another round at ``next_attempt_at``, starting with a look-up."""

    next_attempt_at: datetime
    error: str


@dataclass(frozen=True, slots=True)
class Stalled:
    """The rounds are spent and the outcome is still unknown: raise the alarm (the
    service's failure event, once, at ``alerted_at``: NEEDS_RECONCILIATION) and go on
    looking the payment up at ``next_attempt_at``."""

    alerted_at: datetime
    next_attempt_at: datetime
    error: str


class Round(Protocol):
    """What ``retry_later`` needs of a claim: this round's number (1-based) and
    whether the alarm was raised for it already."""

    @property
    def attempt(self) -> int: ...

    @property
    def alerted(self) -> bool: ...


def retry_later(
    claim: Round, error: str, now: datetime, policy: RetryPolicy, jitter: float
) -> Retry | Stalled:
    """Another round (it starts with a look-up) for an outcome that is not known: the
    money may have moved, so this is never a failure. Within ``max_attempts``: the
    policy's backoff. After them: a backoff capped at ``stalled_max_s``, and the first
    such round raises the alarm (``Stalled``)."""
    if claim.attempt < policy.max_attempts:
        return Retry(now + timedelta(seconds=policy.delay_s(claim.attempt, jitter)), error)
    slow = RetryPolicy(policy.max_attempts, policy.base_s, policy.stalled_max_s)
    at = now + timedelta(seconds=slow.delay_s(claim.attempt, jitter))
    return Retry(at, error) if claim.alerted else Stalled(now, at, error)


@dataclass(frozen=True, slots=True)
class Lookup:
    """Ask the gateway for the payment before doing anything to it."""


@dataclass(frozen=True, slots=True)
class Call:
    """Call the gateway with the intent's one idempotency key."""


OutcomeKind = Literal["succeeded", "declined", "not_found", "unknown"]


@dataclass(frozen=True, slots=True)
class GatewayOutcome:
    """The result of a mutating gateway call. ``code``/``message`` are set for
    ``declined``; ``reason`` says why an outcome is ``unknown`` (``timeout``,
    ``http_503``, …)."""

    kind: OutcomeKind
    body: dict[str, Any] = field(default_factory=dict)
    code: str | None = None
    message: str | None = None
    attempts: int = 1
    reason: str | None = None
