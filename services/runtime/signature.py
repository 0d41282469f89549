"""Gateway webhook signatures (docs/contract.md §2.2): ``t=<unix s>,v1=<hex HMAC-SHA256>``.

The signed message is ``f"{t}.".encode() + raw_body``: callers verify the bytes exactly as
received, before anything parses them as JSON. Everything here is pure — the caller passes
the reference time (the bridge's append time of the record, not the processing time).
"""

from __future__ import annotations

import hashlib
import hmac
import re

__all__ = ["SignatureError", "parse_signature_header", "sign", "verify"]

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_V1 = re.compile(r"[0-9a-fA-F]{64}")
#: More v1 entries than any rotation needs is treated as garbage, not searched.
MAX_SIGNATURES = 16


class SignatureError(ValueError):
    """A signature that must be rejected; ``reason`` is a snake_case code fit for a
    metrics label: ``signature_missing``, ``signature_malformed``, ``signature_invalid``
    or ``timestamp_outside_tolerance``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``paysaga-signature`` header value for ``body`` signed with ``secret`` at
    ``timestamp`` (unix seconds)."""
    return f"t={timestamp},v1={_digest(secret, timestamp, body)}"


def parse_signature_header(value: str | None) -> tuple[int, list[str]]:
    """Split a header into its timestamp and its v1 signatures (lower-case hex).

    Raises ``SignatureError("signature_missing")`` when the header is absent or blank or
    carries no ``v1`` entry, and ``signature_malformed`` when it has no single decimal
    ``t``, an item that is not ``key=value``, a ``v1`` that is not 64 hex digits, or
    more than ``MAX_SIGNATURES`` of them. Other schemes (``v0=…``) are ignored.
    """
    if value is None or not value.strip():
        raise SignatureError("signature_missing", "no paysaga-signature header")
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep or not key:
            raise SignatureError("signature_malformed", "item is not key=value")
        if key == "t":
            timestamps.append(val)
        elif key == "v1":
            if not _V1.fullmatch(val):
                raise SignatureError("signature_malformed", "v1 is not 64 hex digits")
            signatures.append(val.lower())
    if len(timestamps) != 1 or not _TIMESTAMP.fullmatch(timestamps[0]):
        raise SignatureError("signature_malformed", "needs exactly one decimal t")
    if not signatures:
        raise SignatureError("signature_missing", "no v1 signature")
    if len(signatures) > MAX_SIGNATURES:
        raise SignatureError("signature_malformed", "too many v1 signatures")
    return int(timestamps[0]), signatures


def verify(
    secrets: list[str], header: str | None, body: bytes, reference_time: int, tolerance_s: int
) -> int:
    """Verify ``header`` over the raw ``body``; return the signed timestamp.

    Accepted only if some configured secret produces some ``v1`` entry (every secret is
    compared with every entry via ``hmac.compare_digest``, without stopping early, so
    timing says nothing about which matched) and ``|t - reference_time| <= tolerance_s``
    — too old (replay) and too far in the future are both rejected. The signature is
    checked first, so ``timestamp_outside_tolerance`` is only reported for genuine
    bodies. Empty secrets are ignored: a blank config entry never makes anything pass.
    """
    if tolerance_s < 0:
        raise ValueError("tolerance_s must be >= 0")
    timestamp, signatures = parse_signature_header(header)
    matched = False
    for secret in filter(None, secrets):
        expected = _digest(secret, timestamp, body)
        for candidate in signatures:
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("signature_invalid", "no configured secret matches")
    if abs(timestamp - reference_time) > tolerance_s:
        raise SignatureError("timestamp_outside_tolerance", f"t={timestamp}")
    return timestamp
