"""Event ids: UUIDv7 (RFC 9562) in hex, 32 characters — the time first.

Every consumer enters each record's event id into its inbox (a B-tree keyed by consumer
group and id), and the orders projection keeps the audit trail by id. A random id (uuid4)
lands each insert on any page of an index that grows for the inbox retention: pages read
from outside the buffer cache, and after every checkpoint a full page image in the WAL
for nearly every insert. Ids that start with the time they were made land on the pages
most recently written instead. Unique as uuid4 is for this purpose: 74 random bits within
each millisecond. The contract only asks for a unique string of 1..64 characters, so
consumers compare ids, never parse them.
"""

from __future__ import annotations

import os
import time

__all__ = ["new_event_id"]

_RAND_A = (1 << 12) - 1
_RAND_B = (1 << 62) - 1


def new_event_id() -> str:
    """A new UUIDv7 in hex: 48 bits of Unix milliseconds, the version (7), 12 random
    bits, the variant (0b10), 62 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (
        (ms & ((1 << 48) - 1)) << 80
        | 0x7 << 76
        | (rand >> 62 & _RAND_A) << 64
        | 0b10 << 62
        | rand & _RAND_B
    )
    return f"{value:032x}"
