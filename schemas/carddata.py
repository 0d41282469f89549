"""CONTRACT §2.2's definition of card data, in one place.

Card data is a primary account number — a 13–19 digit Luhn-valid number, also typed
with single spaces or dashes between groups — or a key naming a card number or
security code. Nothing here ever returns or logs the matched value.
"""

from __future__ import annotations

import re
from typing import Any

#: keys compared case-insensitively with ``_`` and ``-`` removed
CARD_KEYS = frozenset({"cvv", "cvc", "cvv2", "cvc2", "cardnumber", "pan", "securitycode"})

# digits, optionally separated by one space or dash ("4242 4242 4242 4242"), not glued
# to further digits
_CANDIDATE = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,}(?!\d)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _pan_spans(text: str) -> list[tuple[int, int]]:
    """Spans of ``text`` holding a PAN: a whole run of 13–19 digits that passes Luhn.
    Longer runs are ids, not card numbers."""
    spans = []
    for m in _CANDIDATE.finditer(text):
        digits = "".join(c for c in m.group() if c.isdigit())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            spans.append((m.start(), m.end()))
    return spans


def contains_pan(text: str) -> bool:
    return bool(_pan_spans(text))


def _is_card_key(key: str) -> bool:
    return key.lower().replace("_", "").replace("-", "") in CARD_KEYS


def find_card_data(obj: Any) -> str | None:
    """Walk parsed JSON; return ``security_code_present`` for a card-data key,
    ``card_number_present`` for a PAN in any string or number, else None."""
    stack = [obj]
    found_number = False
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str) and _is_card_key(k):
                    return "security_code_present"
                stack.append(k)
                stack.append(v)
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str | int) and not isinstance(item, bool):
            found_number = found_number or contains_pan(str(item))
    return "card_number_present" if found_number else None


def redact_card_numbers(text: str) -> str:
    """Replace every PAN in ``text`` with ``[REDACTED-PAN]``."""
    out, last = [], 0
    for s, e in _pan_spans(text):
        out.append(text[last:s])
        out.append("[REDACTED-PAN]")
        last = e
    out.append(text[last:])
    return "".join(out)
