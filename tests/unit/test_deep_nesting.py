"""A record nested deeper than the JSON decoder's recursion limit (~1 KB of ``[``) is
bad input like any other: a clear rejection, never an error that escapes the handling
of bad input (a dead-letter hook that raised on it was retried forever, stalling the
consumer)."""

from __future__ import annotations

import pytest

from services.payments.handlers import _flags_its_order
from services.runtime.errors import PermanentError
from services.runtime.inbox import parse_envelope
from services.runtime.messages import Record

NESTED = b"[" * 5000


def test_a_deeply_nested_record_is_invalid_json() -> None:
    with pytest.raises(PermanentError, match="invalid_json"):
        parse_envelope(NESTED)


def test_payments_dead_letter_hook_flags_nothing_for_a_deeply_nested_order_record() -> None:
    rec = Record("checkout.orders.v1", 0, 7, b"ord_1", NESTED, (), 0)
    assert _flags_its_order(rec) is False
