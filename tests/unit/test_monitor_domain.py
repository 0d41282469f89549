"""The monitor's pure decisions: which status is final, deadlines, when to report."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.contract import OrderStatus as S
from schemas.contract import OrderStatusChanged
from schemas.envelope import dump, new_envelope
from services.monitor import domain
from services.monitor.app import MonitorSettings, status_change
from services.monitor.domain import Deadlines, MinuteOutcomes, Saga, StatusChange
from services.runtime.topics import MONITOR_CHANGELOG_TOPIC, load_specs

T0 = 1_800_000_000.0


def change(status: S, version: int, at: float, order_id: str = "ord_1") -> StatusChange:
    return StatusChange(order_id, status, version, at, event_id=f"ev{version}")


def walk(*steps: tuple[S, float]) -> tuple[Saga, list[domain.Outcome]]:
    saga, outcomes = None, []
    for version, (status, at) in enumerate(steps, start=1):
        new, outcome = domain.note_status(saga, change(status, version, at))
        assert new is not None
        saga = new
        outcomes += [outcome] if outcome else []
    assert saga is not None
    return saga, outcomes


def test_final_statuses_are_the_contracts_three() -> None:
    assert {s for s in S if domain.is_final(s)} == {S.PAID_CONFIRMED, S.PAYMENT_FAILED, S.REFUNDED}
    assert S.NEEDS_RECONCILIATION in domain.OPEN
    assert S.REFUND_PENDING in domain.OPEN


def test_deadlines_default_override_and_needs_reconciliation_at_once() -> None:
    d = Deadlines(900, {S.INVENTORY_RESERVED: 30})
    assert d.for_status(S.PENDING_PAYMENT) == 900
    assert d.for_status(S.INVENTORY_RESERVED) == 30
    assert d.for_status(S.NEEDS_RECONCILIATION) == 1
    assert Deadlines(900, {S.NEEDS_RECONCILIATION: 60}).for_status(S.NEEDS_RECONCILIATION) == 60
    with pytest.raises(ValueError, match="at least 1 s"):
        Deadlines(0)


def test_settings_read_the_per_status_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSAGA_MONITOR_STALL_AFTER_S", "600")
    monkeypatch.setenv("PAYSAGA_MONITOR_STALL_AFTER_PAYMENT_AUTHORIZED_S", "20")
    d = MonitorSettings().deadlines()
    assert (d.for_status(S.PENDING_PAYMENT), d.for_status(S.PAYMENT_AUTHORIZED)) == (600, 20)
    assert d.for_status(S.NEEDS_RECONCILIATION) == 1


def test_an_order_is_stalled_from_the_time_it_entered_the_status_not_when_read() -> None:
    d = Deadlines(60)
    saga, _ = walk((S.PENDING_PAYMENT, T0), (S.PAYMENT_AUTHORIZED, T0 + 5))
    assert not domain.needs_alert(saga, T0 + 64, d)
    assert domain.needs_alert(saga, T0 + 65, d)
    # read an hour late (a restarted monitor): judged stalled at once, for how long it was
    assert domain.stalled_for(saga, T0 + 3605) == 3600


def test_a_report_is_made_once_per_order_and_status() -> None:
    d = Deadlines(60)
    saga, _ = walk((S.PENDING_PAYMENT, T0), (S.INVENTORY_RESERVED, T0 + 1))
    assert domain.needs_alert(saga, T0 + 100, d)
    reported = saga.with_alerted()
    assert not domain.needs_alert(reported, T0 + 10_000, d)
    assert domain.is_stalled(reported, T0 + 10_000, d)  # still counted in the gauge
    # survives the table's round trip (the changelog)
    assert Saga.from_dict(reported.to_dict()) == reported
    moved, _ = domain.note_status(reported, change(S.REFUND_PENDING, 3, T0 + 200))
    assert moved is not None
    assert domain.needs_alert(moved, T0 + 300, d)


def test_needs_reconciliation_is_stalled_after_one_second() -> None:
    saga, _ = walk((S.PENDING_PAYMENT, T0), (S.NEEDS_RECONCILIATION, T0 + 2))
    assert not domain.needs_alert(saga, T0 + 2.5, Deadlines(900))
    assert domain.needs_alert(saga, T0 + 3, Deadlines(900))


def test_final_orders_are_never_stalled_and_a_stale_record_does_not_reopen_them() -> None:
    d = Deadlines(1)
    saga, outcomes = walk(
        (S.PENDING_PAYMENT, T0), (S.PAYMENT_AUTHORIZED, T0 + 1), (S.PAID_CONFIRMED, T0 + 7)
    )
    assert not domain.is_stalled(saga, T0 + 10_000, d)
    assert outcomes == [domain.Outcome(S.PAID_CONFIRMED, T0 + 7, 7.0)]
    # a re-delivered older record (a restart re-reads from the committed offset)
    assert domain.note_status(saga, change(S.PAYMENT_AUTHORIZED, 2, T0 + 1)) == (None, None)
    assert domain.note_status(saga, change(S.PAID_CONFIRMED, 3, T0 + 7)) == (None, None)
    assert not domain.prunable(saga, T0 + 7 + domain.FINAL_KEPT_S)
    assert domain.prunable(saga, T0 + 8 + domain.FINAL_KEPT_S)


def test_the_changelog_is_compacted_within_the_time_a_final_marker_is_kept() -> None:
    """What a restarted monitor recovers stays bounded: the changelog closes its segments
    (compaction only cleans closed ones) and drops a pruned marker's tombstone within
    FINAL_KEPT_S, so it holds about one row per order of the last day, not the history."""
    [changelog] = [s for s in load_specs() if s.name == MONITOR_CHANGELOG_TOPIC]
    assert changelog.configs["cleanup.policy"] == "compact"
    kept_ms = domain.FINAL_KEPT_S * 1000
    assert 0 < int(changelog.configs["segment.ms"]) <= kept_ms
    assert 0 < int(changelog.configs["delete.retention.ms"]) <= kept_ms


def test_a_retry_is_a_new_attempt_with_its_own_reports_and_duration() -> None:
    d = Deadlines(10)
    saga, outcomes = walk(
        (S.PENDING_PAYMENT, T0),
        (S.PAYMENT_AUTHORIZED, T0 + 1),
        (S.PAYMENT_FAILED, T0 + 2),
        (S.PENDING_PAYMENT, T0 + 100),
    )
    saga = saga.with_alerted()
    assert saga.alerted == (S.PENDING_PAYMENT,)
    paid, outcome = domain.note_status(saga, change(S.PAID_CONFIRMED, 5, T0 + 130))
    assert outcomes == [domain.Outcome(S.PAYMENT_FAILED, T0 + 2, 2.0)]
    assert outcome == domain.Outcome(S.PAID_CONFIRMED, T0 + 130, 30.0)
    again, _ = domain.note_status(paid, change(S.PENDING_PAYMENT, 6, T0 + 200))
    assert again is not None
    assert again.alerted == ()
    assert domain.needs_alert(again, T0 + 210, d)


def test_an_order_first_seen_in_a_final_status_counts_without_a_duration() -> None:
    _, outcome = domain.note_status(None, change(S.REFUNDED, 7, T0))
    assert outcome == domain.Outcome(S.REFUNDED, T0, None)


def test_stalled_counts_cover_every_open_status() -> None:
    d = Deadlines(10)
    stuck, _ = walk((S.PENDING_PAYMENT, T0), (S.INVENTORY_RESERVED, T0))
    fresh, _ = walk((S.PENDING_PAYMENT, T0 + 95))
    paid, _ = walk((S.PENDING_PAYMENT, T0), (S.PAID_CONFIRMED, T0))
    counts = domain.stalled_counts([stuck, fresh, paid], T0 + 100, d)
    assert counts == {s.value: (1 if s is S.INVENTORY_RESERVED else 0) for s in domain.OPEN}


def test_the_report_event_id_is_the_same_for_the_same_visit() -> None:
    saga, _ = walk((S.PENDING_PAYMENT, T0), (S.INVENTORY_RESERVED, T0 + 1))
    assert domain.stalled_event_id("ord_1", saga) == domain.stalled_event_id("ord_1", saga)
    assert domain.stalled_event_id("ord_1", saga) != domain.stalled_event_id("ord_2", saga)
    later, _ = domain.note_status(saga, change(S.REFUND_PENDING, 3, T0 + 2))
    assert later is not None
    assert domain.stalled_event_id("ord_1", saga) != domain.stalled_event_id("ord_1", later)


def test_outcomes_per_tumbling_minute_of_event_time() -> None:
    m = MinuteOutcomes()
    minute = 60 * 30_000_000
    m.add(S.PAID_CONFIRMED, minute + 1)
    m.add(S.PAID_CONFIRMED, minute + 59.9)
    m.add(S.PAYMENT_FAILED, minute + 30)
    m.add(S.PAID_CONFIRMED, minute + 60)  # the next minute
    assert m.last_complete(minute + 59) == {"PAID_CONFIRMED": 0, "PAYMENT_FAILED": 0, "REFUNDED": 0}
    assert m.last_complete(minute + 61) == {"PAID_CONFIRMED": 2, "PAYMENT_FAILED": 1, "REFUNDED": 0}
    assert m.last_complete(minute + 121) == {
        "PAID_CONFIRMED": 1,
        "PAYMENT_FAILED": 0,
        "REFUNDED": 0,
    }
    m.last_complete(minute + 600)
    assert list(m.windows) == []


def _status_record(**envelope: Any) -> bytes:
    """An OrderStatusChanged record of ord_1 (INVENTORY_RESERVED, version 3) at T0."""
    payload = {
        "order_id": "ord_1",
        "status": "INVENTORY_RESERVED",
        "previous_status": "PAYMENT_AUTHORIZED",
        "reason": None,
        "payment_intent_id": "pi_1",
        "transaction_id": "txn_1",
        "amount": 1500,
        "currency": "EUR",
        "version": 3,
    }
    return dump(
        new_envelope(
            "OrderStatusChanged",
            OrderStatusChanged.model_validate(payload),
            now=datetime.fromtimestamp(T0, UTC),
            event_id="e1",
            **envelope,
        )
    )


def test_a_status_record_is_read_with_the_time_it_happened() -> None:
    value = _status_record(causation_id="c", saga_seq=4, correlation_id="k")
    got = status_change(b"ord_1", value)
    assert (got.status, got.version, got.at, got.saga_seq) == (S.INVENTORY_RESERVED, 3, T0, 4)
    with pytest.raises(ValueError, match="order_id"):
        status_change(b"ord_2", value)
    with pytest.raises(ValueError, match="tombstone"):
        status_change(b"ord_1", None)


def test_a_status_records_trace_is_kept_for_its_stalled_report() -> None:
    """The monitor keeps the status record's traceparent (a valid one only) in its table,
    so the SagaStalled it may send continues the order's trace."""
    value = _status_record()
    tp = f"00-{'a' * 32}-{'b' * 16}-01"
    got = status_change(b"ord_1", value, tp.encode())
    assert got.traceparent == tp
    assert status_change(b"ord_1", value, b"00-not-a-trace").traceparent is None
    assert status_change(b"ord_1", value).traceparent is None
    saga, _ = domain.note_status(None, got)
    assert saga is not None
    assert saga.traceparent == tp
    assert Saga.from_dict(saga.to_dict()) == saga
    # a table row written before the trace was kept reads as one without a trace
    old_row = {k: v for k, v in saga.to_dict().items() if k != "traceparent"}
    assert Saga.from_dict(old_row).traceparent is None
