"""Event ids are UUIDv7 in hex: unique, and ordered by the millisecond they were made
(what keeps each inbox insert on the index's newest pages)."""

import time
import uuid

from services.runtime.ids import new_event_id


def test_an_event_id_is_a_uuid7_in_hex() -> None:
    event_id = new_event_id()
    parsed = uuid.UUID(event_id)
    assert len(event_id) == 32
    assert event_id == parsed.hex
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    # its first 48 bits are the Unix milliseconds it was made at
    made_at_ms = int(event_id[:12], 16)
    assert abs(made_at_ms - time.time_ns() // 1_000_000) < 5_000


def test_event_ids_are_unique_and_a_later_millisecond_sorts_after() -> None:
    first = [new_event_id() for _ in range(50_000)]
    assert len(set(first)) == len(first)
    ms = int(first[-1][:12], 16)
    deadline = time.monotonic() + 5
    while (later := new_event_id()) and int(later[:12], 16) <= ms:
        assert time.monotonic() < deadline, "the clock did not move"
    assert later > max(first)  # as text, as the inbox's index compares them
