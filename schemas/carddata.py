"""CONTRACT §2.2's definition of card data, in one place (payments' rejection rule,
the audit model's guard, the dead-letter redaction).

Card data is a primary account number — a Luhn-valid number of 13-19 digits, plain or
in groups joined by single spaces or dashes, as people type card numbers — or a key
naming a card number or security code. Nothing here returns or logs a matched value.

A number stands on its own: digits inside an alphanumeric token are part of an id, not
a card number. Gateway ids are hex or base62 (``evt_4194986994504da1daa0004f``); about
one 13-digit run in ten passes Luhn by chance, and treating such runs as card numbers
refused genuine payments (found by the 50-concurrent-orders e2e test).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

CARD_NUMBER_PRESENT = "card_number_present"
SECURITY_CODE_PRESENT = "security_code_present"

# Compared after lower-casing and dropping "_" and "-", so "Card-Number" and "CVV_2" match.
CARD_KEYS = frozenset({"cvv", "cvc", "cvv2", "cvc2", "cardnumber", "pan", "securitycode"})
# Digit groups joined by exactly one space or dash, not glued to letters or digits.
_DIGIT_GROUPS = re.compile(r"(?<![A-Za-z0-9])\d+(?:[ -]\d+)*(?![A-Za-z0-9])")
_GROUP = re.compile(r"\d+")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _pan_spans(text: str) -> Iterator[tuple[int, int]]:
    # Candidates are runs of whole groups only: a 13-19 digit window cut out of a longer
    # plain run (a 24-digit reference, a hex id) is not a card number, and flagging every
    # window of a long run would reject ordinary ids about as often as not.
    for match in _DIGIT_GROUPS.finditer(text):
        groups = list(_GROUP.finditer(match.group()))
        for start in range(len(groups)):
            digits = ""
            for end in range(start, len(groups)):
                digits += groups[end].group()
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_valid(digits):
                    yield match.start() + groups[start].start(), match.start() + groups[end].end()
                    break


def contains_pan(text: str) -> bool:
    return next(_pan_spans(text), None) is not None


def is_card_key(key: str) -> bool:
    return key.lower().replace("_", "").replace("-", "") in CARD_KEYS


def find_card_data(obj: object) -> str | None:
    """The reason code for card data anywhere in parsed JSON ``obj``, else None:
    ``card_number_present`` (a PAN in any key, string or number; it takes precedence) or
    ``security_code_present`` (a key naming card data)."""
    key_found = False
    stack: list[object] = [obj]
    while stack:  # iterative: attacker-controlled nesting must not hit the recursion limit
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                key_found = key_found or is_card_key(str(key))
                stack.append(str(key))
                stack.append(value)
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif (
            isinstance(node, str | int | float)
            and not isinstance(node, bool)
            and contains_pan(str(node))
        ):
            return CARD_NUMBER_PRESENT
    return SECURITY_CODE_PRESENT if key_found else None


def redact_card_numbers(text: str) -> str:
    """``text`` with every PAN replaced by ``[REDACTED-PAN]``."""
    out, last = [], 0
    for start, end in sorted(_pan_spans(text)):
        if start < last:
            continue  # overlaps one already redacted
        out += [text[last:start], "[REDACTED-PAN]"]
        last = end
    out.append(text[last:])
    return "".join(out)


def find_card_data_in_bytes(raw: bytes) -> str | None:
    """:func:`find_card_data` for a raw body: parsed when it is JSON, else scanned as text."""
    text = raw.decode("utf-8", "replace")
    try:
        return find_card_data(json.loads(text))
    except ValueError:
        return CARD_NUMBER_PRESENT if contains_pan(text) else None
