"""Dead letters: one topic per consumer group (``paysaga.<service>.dlq``).

A dead letter carries the original key and value with headers naming where it came
from and why it failed. Card numbers never reach a dead letter: values and error
messages are scrubbed of anything that looks like a primary account number first.

A group's dead-letter topic is also its control channel (the group's consumer reads
it too, and ignores the dead letters themselves): nothing is ever written back to a
topic that others read — ``orders.status.v1``, say, is a compacted contract output.
Replay publishes the original record there with its original record timestamp (the
gateway signature tolerance is measured against it), addressed to the group that
failed it (``paysaga-target-group``); the consumer handles it as a record of its
original topic (named by ``paysaga-dead-letter``). The consumer's inbox makes a replay
safe to repeat. Purge publishes a release control record instead, which unblocks the
key and releases its blocked records without applying the dead letter. Both name the
dead letter they resolve and do nothing once it is resolved (so a purged record cannot be replayed
later, out of order). These control headers count only on a record read from the
group's own dead-letter topic: on any other topic they are data like any header.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime

from schemas.carddata import redact
from services.runtime.errors import describe
from services.runtime.messages import Record
from services.runtime.producer import RenewingProducer

H_PREFIX = "paysaga-dlq-"
H_TOPIC = "paysaga-dlq-original-topic"
H_PARTITION = "paysaga-dlq-original-partition"
H_OFFSET = "paysaga-dlq-original-offset"
H_TIMESTAMP = "paysaga-dlq-original-timestamp"
H_GROUP = "paysaga-dlq-consumer-group"
H_ERROR_CLASS = "paysaga-dlq-error-class"
H_ERROR_MESSAGE = "paysaga-dlq-error-message"
H_ATTEMPTS = "paysaga-dlq-attempts"
H_FIRST_FAILURE = "paysaga-dlq-first-failure-at"
H_REDACTED = "paysaga-dlq-redacted"

H_TARGET_GROUP = "paysaga-target-group"
H_REPLAY_OF = "paysaga-replay-of"
H_CONTROL = "paysaga-control"
CONTROL_RELEASE = b"release"
#: on replay and release records: the failed record the dead letter is about, as JSON
#: [topic, partition, offset] (the dead_letters row's key). The consumer acts only while
#: that dead letter is still open, so repeating a replay or purge never unblocks a key
#: whose head-of-line record failed since.
H_DEAD_LETTER = "paysaga-dead-letter"


def dlq_topic(group: str) -> str:
    return f"{group}.dlq"


def redacted_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``headers`` with card data redacted from their values (unchanged values keep
    their exact bytes: a replay needs e.g. the gateway signature as it was)."""
    out = []
    for k, v in headers:
        r = redact(v.decode("utf-8", "replace"))
        out.append((k, r.text.encode() if r.kinds else v))
    return out


def redacted_value(value: bytes) -> tuple[bytes, tuple[str, ...]]:
    """``value`` with card data redacted, and what was replaced (nothing: same bytes)."""
    r = redact(value.decode("utf-8", "replace"))
    return (r.text.encode(), r.kinds) if r.kinds else (value, ())


def headers_for(
    rec: Record, group: str, exc: BaseException, attempts: int, first: datetime
) -> list[tuple[str, bytes]]:
    own = [
        (H_TOPIC, rec.topic),
        (H_PARTITION, str(rec.partition)),
        (H_OFFSET, str(rec.offset)),
        (H_TIMESTAMP, str(rec.timestamp_ms)),
        (H_GROUP, group),
        (H_ERROR_CLASS, type(exc).__name__),
        (H_ERROR_MESSAGE, describe(exc)[:2000]),
        (H_ATTEMPTS, str(attempts)),
        (H_FIRST_FAILURE, first.strftime("%Y-%m-%dT%H:%M:%S.%fZ")),
    ]
    # the original headers travel on (a replay needs e.g. the gateway signature), minus
    # any routing headers of an earlier replay
    routing = (H_TARGET_GROUP, H_REPLAY_OF, H_CONTROL, H_DEAD_LETTER)
    original = [(k, v) for k, v in rec.headers if not k.startswith(H_PREFIX) and k not in routing]
    return [(k, v.encode()) for k, v in own] + redacted_headers(original)


class DeadLetterProducer:
    """Publishes dead letters with acks=all through an idempotent producer, renewed
    after a failed send (services/runtime/producer.py); the callers retry."""

    def __init__(self, bootstrap: str, client_id: str) -> None:
        self._producer = RenewingProducer(bootstrap, f"{client_id}-dlq", 15000)

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send_dead_letter(
        self, group: str, rec: Record, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        value, kinds = redacted_value(rec.value)
        hdrs = list(headers)
        if kinds:
            hdrs.append((H_REDACTED, ",".join(kinds).encode()))
        await self._producer.send_and_wait(dlq_topic(group), value, rec.key, hdrs)


def header_dict(headers: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in headers}


def replay_record(dead: Record) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]], int]:
    """(topic, key, value, headers, timestamp_ms) of the replay of one dead letter."""
    h = header_dict(dead.headers)
    original = [(k, v) for k, v in dead.headers if not k.startswith(H_PREFIX)]
    origin = json.dumps([dead.topic, dead.partition, dead.offset]).encode()
    headers = [
        *original,
        (H_TARGET_GROUP, h[H_GROUP].encode()),
        (H_REPLAY_OF, origin),
        (H_DEAD_LETTER, _failed_record(h)),
    ]
    return dlq_topic(h[H_GROUP]), dead.key, dead.value, headers, int(h[H_TIMESTAMP])


def release_record(dead: Record) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
    """(topic, key, value, headers) of the control record that purges one dead letter."""
    h = header_dict(dead.headers)
    headers = [
        (H_TARGET_GROUP, h[H_GROUP].encode()),
        (H_CONTROL, CONTROL_RELEASE),
        (H_DEAD_LETTER, _failed_record(h)),
    ]
    return dlq_topic(h[H_GROUP]), dead.key, b"{}", headers


def _failed_record(h: dict[str, str]) -> bytes:
    return json.dumps([h[H_TOPIC], int(h[H_PARTITION]), int(h[H_OFFSET])]).encode()


def is_control(rec: Record) -> bool:
    """A replay or release record (found on a dead-letter topic next to dead letters).
    Only meaningful for a record read from a dead-letter topic."""
    return rec.header(H_TARGET_GROUP) is not None


def control_view(rec: Record) -> Record | None:
    """A replay or release read from a dead-letter topic, as the record it acts on: the
    failed record's topic, partition and offset (its route, its dead letter) with the
    control record's key, value and headers. None for a dead letter itself."""
    named = rec.header(H_DEAD_LETTER)
    if not is_control(rec) or named is None:
        return None
    topic, partition, offset = failed_record(named)
    return dataclasses.replace(rec, topic=topic, partition=partition, offset=offset)


def failed_record(value: bytes) -> tuple[str, int, int]:
    """The (topic, partition, offset) of an ``H_DEAD_LETTER`` header."""
    topic, partition, offset = json.loads(value)
    return str(topic), int(partition), int(offset)
