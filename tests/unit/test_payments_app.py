"""Unit tests of services/payments/app.py: the inbox key of a raw webhook record."""

from __future__ import annotations

from services.payments.app import confirmation_dedupe_key
from services.runtime.messages import Record

BODY = b'{"id":"evt_1"}'


def webhook(body: bytes, signature: bytes) -> Record:
    headers = (("paysaga-gateway", b"simgw"), ("paysaga-signature", signature))
    return Record("gateway.confirmations.v1", 0, 7, b"ord_1", body, headers, 0)


def test_a_gateway_retry_of_the_same_delivery_has_the_same_key() -> None:
    assert confirmation_dedupe_key(webhook(BODY, b"t=1,v1=aa")) == confirmation_dedupe_key(
        webhook(BODY, b"t=1,v1=aa")
    )


def test_the_same_body_resent_with_a_new_signature_is_a_new_delivery() -> None:
    """e.g. rejected during a secret-rotation lag, then resent by an operator: it must be
    verified again, not dropped as a duplicate (real duplicates are caught after
    verification by gateway event id and transaction + type)."""
    first = confirmation_dedupe_key(webhook(BODY, b"t=1,v1=aa"))
    assert confirmation_dedupe_key(webhook(BODY, b"t=2,v1=bb")) != first
    assert confirmation_dedupe_key(webhook(BODY + b" ", b"t=1,v1=aa")) != first
