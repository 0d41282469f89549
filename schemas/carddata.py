"""docs/contract.md §2.2's definition of card data, in one place (payments' rejection rule,
the bridge's refusal, the audit model's guard, and :func:`redact`: the one redaction
of everything the runtime logs, dead-letters or parks).

Card data is a primary account number — a Luhn-valid number of 13-19 digits, plain or
in groups joined by single spaces or dashes, as people type card numbers — or a key
naming a card number or security code. Nothing here returns or logs a matched value.

A number stands on its own: digits inside an alphanumeric token are part of an id, not
a card number. Gateway ids are hex or base62 (``evt_4194986994504da1daa0004f``); about
one 13-digit run in ten passes Luhn by chance, and treating such runs as card numbers
refused genuine payments (found by the 50-concurrent-orders e2e test).

Identifier fields are not card data (:func:`is_id_key`): the scalar value of a key named
``id``, ending in ``_id``, or ``sku`` is not scanned for numbers — an all-digit order id
(snowflake ids are 18-19 digits) passes Luhn one time in ten and is still an order id.
Every other value is scanned, keys too, and a card-data key is card data wherever it is,
under an id field as well. Only structure makes an identifier: in a JSON document the
redaction keeps exactly the fields the acceptance rule does not scan, so a dead-lettered
or parked record keeps its ids intact (an operator finds it by them, a replay still names
its order, a replayed confirmation still verifies); free text (log lines, error texts, a
body that is not JSON) has no fields, so every card-like number there is masked — an id
too, which its record, its Kafka key and the status API still show.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from typing import NamedTuple

CARD_NUMBER_PRESENT = "card_number_present"
SECURITY_CODE_PRESENT = "security_code_present"

# Compared after lower-casing and dropping "_" and "-", so "Card-Number" and "CVV_2" match.
CARD_KEYS = frozenset({"cvv", "cvc", "cvv2", "cvc2", "cardnumber", "pan", "securitycode"})
# Digit groups joined by exactly one space or dash, not glued to letters or digits.
_DIGIT_GROUPS = re.compile(r"(?<![A-Za-z0-9])\d+(?:[ -]\d+)*(?![A-Za-z0-9])")
_GROUP = re.compile(r"\d+")
REDACTED = "[redacted]"
# words of a key that say it holds a card (``is_id_key``)
_CARD_WORDS = frozenset({"card", "pan"}) | CARD_KEYS
_WORD_SEPARATORS = re.compile(r"[_-]+")
_TOKEN = re.compile(r"\S+")
_ASCII_DIGITS = re.compile(r"[0-9]+")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_COLON = re.compile(r"[ \t\r\n]*:[ \t\r\n]*")
# A card-data key and its value in free text (error messages, dict reprs, JSON quoted
# inside a string): the key spelled as ``is_card_key`` accepts it, maybe quoted; the
# value quoted (escaped quotes too) or a bare token. Only card-data keys match, so the
# quoted value of another key cannot swallow one; bare tokens stop at quotes, so a
# "cvv=123" inside a JSON string leaves the JSON valid.
_KEY_VALUE = re.compile(
    r"(?<![A-Za-z0-9_-])(?P<key>[_-]*(?:"
    + "|".join("[_-]*".join(k) for k in sorted(CARD_KEYS, key=len, reverse=True))
    + r""")[_-]*)(?![A-Za-z0-9_-])(?P<sep>(?:\\?["'])?\s*[:=]\s*)"""
    r"""(?:(?P<q>\\?["']).*?(?<!\\)(?P=q)|\[[^\]\s]*\]|[^\s,;)}\]"'\\]+)""",
    re.IGNORECASE,
)
# pydantic renders each bad input apart from its key (on the line below the field name):
# no input of a validation error is worth the risk of keeping.
_PYDANTIC_INPUT = re.compile(r"input_value=.*?, input_type=")


class _Pairs(list[tuple[str, object]]):
    """A parsed JSON object as all its key/value pairs: ``json.loads`` keeps only the
    last of repeated keys, and card data must not hide behind a repeated key."""


def _parse(text: str) -> object:
    """``text`` as JSON with every key/value pair kept. Raises ``ValueError`` (and
    ``RecursionError`` for absurd nesting) when it is not JSON."""
    return json.loads(text, object_pairs_hook=_Pairs)


def luhn_valid(digits: str) -> bool:
    """``digits``: decimal digits of any script (what ``\\d`` matches; ``int`` reads them)."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char)
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


def is_id_key(key: str) -> bool:
    """An identifier field (docs/contract.md §2.2): ``id``, ``*_id`` or ``sku``, exactly as spelt —
    but not one whose name says it holds a card (``card_id``, ``pan_id``,
    ``card_number_id``): what such a field identifies is a card, so it is scanned."""
    if not (key in ("id", "sku") or key.endswith("_id")):
        return False
    words = set(_WORD_SEPARATORS.split(key.lower()))
    return not (words & _CARD_WORDS or is_card_key(key[:-3]))


def _pan_in_identifier(value: str) -> bool:
    """Whether an identifier field's value holds a card number all the same: an
    identifier is one token of ASCII characters, so a card-like number counts unless it is
    a plain run of ASCII digits in a value without whitespace (an all-digit id) — digits
    grouped the way card numbers are typed, other scripts' digits, or a number among
    words are a card number in any field."""
    spans = list(_pan_spans(value))
    token = _TOKEN.fullmatch(value) is not None
    return any(not (token and _ASCII_DIGITS.fullmatch(value[a:b])) for a, b in spans)


def _scalar(value: object) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool)


def find_card_data(obj: object, identifiers: Collection[str] = ()) -> str | None:
    """The reason code for card data anywhere in parsed JSON ``obj``, else None:
    ``card_number_present`` (a PAN in any key, string or number, except the scalar value
    of an identifier field — or of a key in ``identifiers``, the fields of an internal
    model that hold an identifier under another name; it takes precedence) or
    ``security_code_present`` (a key naming card data)."""
    key_found = False
    stack: list[object] = [obj]
    while stack:  # iterative: attacker-controlled nesting must not hit the recursion limit
        node = stack.pop()
        if isinstance(node, dict | _Pairs):
            for key, value in node.items() if isinstance(node, dict) else node:
                key_found = key_found or is_card_key(str(key))
                stack.append(str(key))
                if not ((is_id_key(str(key)) or key in identifiers) and _scalar(value)):
                    stack.append(value)
                elif _pan_in_identifier(str(value)):
                    return CARD_NUMBER_PRESENT
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif _scalar(node) and contains_pan(str(node)):
            return CARD_NUMBER_PRESENT
    return SECURITY_CODE_PRESENT if key_found else None


def find_card_data_in_bytes(raw: bytes) -> str | None:
    """:func:`find_card_data` for a raw body: every key/value pair of it when it is JSON
    (repeated keys included), else its text — for card numbers and card-data keys."""
    text = raw.decode("utf-8", "replace")
    try:
        parsed = _parse(text)
    except (ValueError, RecursionError):
        if contains_pan(text):
            return CARD_NUMBER_PRESENT
        if _KEY_VALUE.search(text) is not None:
            return SECURITY_CODE_PRESENT
        return None
    return find_card_data(parsed)


class Redacted(NamedTuple):
    text: str
    #: what was replaced: "card_number" (a PAN), "card_key" (the value of a card-data key)
    kinds: tuple[str, ...]


def redact(text: str) -> Redacted:
    """``text`` without card data: in a JSON document the value (of any type) of every
    card-data key, at any depth, repeated keys included; in any text a ``key: value`` or
    ``key=value`` of a card-data key, pydantic's rendering of bad inputs, and every PAN
    (``[REDACTED-PAN]``) but one that is a JSON document's identifier field (the module's
    docstring says why). Everything else is kept byte for byte. The one redaction of
    error texts, log lines, dead letters and parked records.

    A redacted dead letter or parked record is replayed redacted: fine, a record that
    carried card data is rejected anyway (a card-data key stays, a changed body fails
    its signature)."""
    keys, ids, replaced = _redact_json_keys(text)
    # PANs before free-text keys: "card_number: 4111 1111 1111 1111" must not lose only
    # its first group to the key rule
    pans = _redact_pans(keys, ids)
    out = _KEY_VALUE.sub(_redact_key_value, pans)
    out = _PYDANTIC_INPUT.sub(f"input_value={REDACTED}, input_type=", out)
    kinds = ("card_number",) * (pans != keys or "card_number" in replaced) + ("card_key",) * (
        "card_key" in replaced or out != pans
    )
    return Redacted(out, kinds)


def _redact_json_keys(text: str) -> tuple[str, list[tuple[int, int]], set[str]]:
    """``text`` with the value of every card-data key redacted when it is a JSON
    document, the spans (in the result) of its identifier fields' scalar values, and
    what was replaced: ``card_key`` (a card-data key's value), ``card_number`` (a PAN
    spelt with escapes)."""
    try:
        _parse(text)
    except (ValueError, RecursionError):
        return text, [], set()
    # Replaced in place rather than re-serialized, so nothing else of the record changes.
    # In a valid document a string followed by a colon is a key, and strings are found in
    # order from the start, so one inside another string is never mistaken for a key.
    decoder, out, pos = json.JSONDecoder(), [], 0
    size = 0  # of the result so far: where an identifier's value lands in it
    ids: list[tuple[int, int]] = []
    replaced: set[str] = set()
    while (string := _JSON_STRING.search(text, pos)) is not None:
        colon = _JSON_COLON.match(text, string.end())
        key = str(json.loads(string.group())) if colon is not None else ""
        if colon is None and "\\" in string.group():
            # a string value with escapes: "\u0034111…" is a PAN the scan of the parsed
            # document finds but the text does not show
            decoded = str(json.loads(string.group()))
            if contains_pan(decoded):
                out += [text[pos : string.start()], json.dumps(_redact_pans(decoded, []))]
                size += len(out[-2]) + len(out[-1])
                pos = string.end()
                replaced.add("card_number")
                continue
        upto = colon.end() if colon is not None and (is_card_key(key) or is_id_key(key)) else 0
        out.append(text[pos : upto or string.end()])
        size += len(out[-1])
        pos = upto or string.end()
        if not upto:
            continue
        try:
            value, end = decoder.raw_decode(text, pos)
        except RecursionError:
            value, end = None, len(text)  # a value nested too deep to measure: the rest goes
        if is_card_key(key):
            out.append(json.dumps(REDACTED))
            size += len(out[-1])
            pos = end
            replaced.add("card_key")
        elif _scalar(value) and not _pan_in_identifier(str(value)):
            # an identifier; a container under an id key is scanned
            ids.append((size, size + end - pos))
    out.append(text[pos:])
    return "".join(out), ids, replaced


def _redact_key_value(match: re.Match[str]) -> str:
    quote = match["q"] or ""
    return f"{match['key']}{match['sep']}{quote}{REDACTED}{quote}"


def _redact_pans(text: str, ids: list[tuple[int, int]]) -> str:
    """``text`` with every PAN masked but one within an identifier field's value (``ids``)."""
    out, last = [], 0
    for start, end in sorted(_pan_spans(text)):
        if start < last:
            continue  # overlaps one already redacted
        if any(a <= start and end <= b for a, b in ids):
            continue
        out += [text[last:start], "[REDACTED-PAN]"]
        last = end
    out.append(text[last:])
    return "".join(out)
