"""The relay's pure parts: waves (no row in flight beside an earlier row of its key) and
which produce errors set a row aside."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import errors as kafka_errors

from services.runtime.errors import refused_by_kafka
from services.runtime.relay import _waves, event_type_of


def row(id_: int, key: bytes | None) -> SimpleNamespace:
    return SimpleNamespace(id=id_, key=key)


def test_waves_hold_the_nth_row_of_each_key_in_id_order() -> None:
    rows = [row(1, b"a"), row(2, b"b"), row(3, b"a"), row(4, None), row(5, b"a"), row(6, b"b")]
    assert [[r.id for r in w] for w in _waves(rows)] == [[1, 2, 4], [3, 6], [5]]


def test_waves_of_nothing() -> None:
    assert _waves([]) == []


def test_only_what_kafka_refuses_about_the_record_itself_is_for_good() -> None:
    for exc in (
        kafka_errors.MessageSizeTooLargeError(),
        kafka_errors.RecordListTooLargeError(),
        kafka_errors.InvalidTopicError(),
        kafka_errors.TopicAuthorizationFailedError("t"),
    ):
        assert refused_by_kafka(exc), exc
    for exc in (
        kafka_errors.UnknownTopicOrPartitionError(),  # topics apply creates it
        kafka_errors.KafkaTimeoutError(),
        kafka_errors.KafkaConnectionError(),
        kafka_errors.NotLeaderForPartitionError(),
        kafka_errors.OutOfOrderSequenceNumber(),  # the producer's state, not the record
        TimeoutError(),
    ):
        assert not refused_by_kafka(exc), exc


def test_event_type_of_an_envelope_or_a_raw_row() -> None:
    assert event_type_of(b'{"event_id":"e1","event_type":"StockReserved"}') == "StockReserved"
    assert event_type_of(b"not json") == "?"
    assert event_type_of(b"[1, 2]") == "?"
