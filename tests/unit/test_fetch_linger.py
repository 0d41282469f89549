"""The fetch wait follows the consumer's record rate (``services.runtime.linger``)."""

from __future__ import annotations

from services.runtime.linger import FetchWait, Linger, settable

QUIET = FetchWait(min_bytes=1, max_wait_ms=500)
BUSY = FetchWait(min_bytes=16384, max_wait_ms=100)


def linger(above: float = 100.0) -> Linger:
    return Linger(quiet=QUIET, busy=BUSY, above_per_s=above)


def test_a_consumer_above_the_rate_lingers_and_goes_quiet_again_when_the_rate_falls() -> None:
    lg = linger()
    assert lg.polled(0.0, 0) is None  # the window opens
    assert lg.polled(0.5, 50) is None
    assert lg.polled(1.0, 60) == BUSY  # 110 records in 1 s
    assert lg.lingering
    assert lg.polled(2.0, 150) is None  # still busy: unchanged
    assert lg.polled(3.0, 40) == QUIET  # 40/s
    assert not lg.lingering
    assert lg.polled(4.0, 10) is None


def test_at_or_below_the_rate_and_idle_polls_it_never_lingers() -> None:
    lg = linger()
    assert lg.polled(0.0, 0) is None
    for t in range(10):
        assert lg.polled(t + 0.5, 50) is None
        assert lg.polled(t + 1.0, 50) is None  # exactly 100/s is not above
        assert lg.polled(t + 1.0, 0) is None  # an idle poll
    assert not lg.lingering


def test_the_first_poll_a_backlog_brings_is_not_a_rate() -> None:
    lg = linger()
    assert lg.polled(0.0, 500) is None  # a backlog waiting at start, not 500/s
    assert lg.polled(1.0, 20) is None
    assert not lg.lingering


def test_a_long_gap_between_polls_counts_as_quiet() -> None:
    lg = linger()
    lg.polled(0.0, 0)
    assert lg.polled(1.0, 500) == BUSY
    assert lg.polled(30.0, 500) == QUIET  # 500 records over 29 s


def test_disabled_it_never_lingers_and_reset_forgets_the_last_decision() -> None:
    off = linger(above=0.0)
    off.polled(0.0, 0)
    assert off.polled(1.0, 10_000) is None
    assert off.polled(2.0, 10_000) is None
    lg = linger()
    lg.polled(0.0, 0)
    assert lg.polled(1.0, 500) == BUSY
    lg.reset()  # a new consumer starts quiet
    assert not lg.lingering
    lg.polled(2.0, 0)
    assert lg.polled(3.0, 500) == BUSY


def test_a_consumer_whose_fetch_wait_cannot_be_set_never_lingers() -> None:
    class Elsewhere:  # an aiokafka that keeps the wait under other names
        _fetcher = object()

    assert not settable(Elsewhere())
    lg = linger()
    lg.reset(enabled=False)
    lg.polled(0.0, 0)
    assert lg.polled(1.0, 10_000) is None
    assert not lg.lingering
