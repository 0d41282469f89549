"""Card data is never written anywhere (docs/contract.md §2.2): detection that repeated JSON keys
cannot fool, the one redaction (schemas/carddata.py) and the error texts built on it."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from schemas.carddata import (
    CARD_NUMBER_PRESENT,
    SECURITY_CODE_PRESENT,
    contains_pan,
    find_card_data,
    find_card_data_in_bytes,
    luhn_valid,
    redact,
)
from schemas.contract import OrderPlaced
from schemas.events import AuditRecorded
from services.orders.handlers import SagaEvent
from services.payments.handlers import PaymentsHandlers
from services.payments.metrics import Metrics
from services.runtime import dlq, signature
from services.runtime.errors import PermanentError, describe
from services.runtime.errors import validated as _validate
from services.runtime.logs import JsonFormatter, TextFormatter
from services.runtime.messages import Record

PAN, CVV = "4111111111111111", "987"
SECRET = "whsec_unit"
HIDDEN = (
    b'{"id":"evt_1","type":"payment.authorized","created":1763805600,'
    b'"data":{"card_number":"4111111111111111","cvv":"987"},'
    b'"data":{"transaction_id":"txn_1","payment_intent_id":"pi_1","order_id":"ord_1",'
    b'"amount":100,"currency":"EUR","payment_method":{"type":"card"}}}'
)


def leaks(text: str) -> bool:
    return PAN in text or CVV in text


# --- detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (HIDDEN, CARD_NUMBER_PRESENT),
        (b'{"data":{"CVV":"987"},"data":{"order_id":"o"}}', SECURITY_CODE_PRESENT),
        (b'{"a":[{"x":{"pan":1},"x":{}}],"a":[]}', SECURITY_CODE_PRESENT),
        (b"not json, card 4111 1111 1111 1111", CARD_NUMBER_PRESENT),
        (b"cvv=987&amount=1", SECURITY_CODE_PRESENT),
        (b'{"data":{"order_id":"o"},"data":{"order_id":"p"}}', None),
        (b"[" * 100_000, None),  # too deep for json: scanned as text, not a crash
    ],
)
def test_repeated_keys_and_non_json_bodies_are_scanned_whole(
    body: bytes, reason: str | None
) -> None:
    assert find_card_data_in_bytes(body) == reason


def test_payments_rejects_card_data_behind_a_repeated_key() -> None:
    handlers = PaymentsHandlers(
        {"simgw": [SECRET]}, 300, timedelta(hours=24), Metrics.create(CollectorRegistry())
    )
    now = int(datetime.now(UTC).timestamp())
    headers = (
        ("paysaga-gateway", b"simgw"),
        ("paysaga-signature", signature.sign(SECRET, now, HIDDEN).encode()),
    )
    rec = Record("gateway.confirmations.v1", 0, 1, b"ord_1", HIDDEN, headers, now * 1000)
    assert handlers._check(rec) == CARD_NUMBER_PRESENT


# --- redaction ---------------------------------------------------------------------


def test_redaction_replaces_card_key_values_at_any_depth_and_keeps_the_rest() -> None:
    body = (
        '{"id": "evt_1",\n "data": {"Card-Number": "4111 1111 1111 1111", "CVV": 987,'
        ' "c\\u0076c": {"nested": ["987"]}, "note": "caf\\u00e9", "amount": 100},'
        ' "data": {"pan": "4111111111111111"}}'
    )
    out = redact(body)
    assert out.text == (
        '{"id": "evt_1",\n "data": {"Card-Number": "[redacted]", "CVV": "[redacted]",'
        ' "c\\u0076c": "[redacted]", "note": "caf\\u00e9", "amount": 100},'
        ' "data": {"pan": "[redacted]"}}'
    )
    assert out.kinds == ("card_key",)


@pytest.mark.parametrize(
    "text",
    [
        f"card: {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]} exp 12/30",
        f"{{'cvv': '{CVV}', 'card_number': {PAN}}}",  # a dict repr in an error message
        f'payload {{"body": "{{\\"cvv\\": \\"{CVV}\\"}}"}}',  # JSON quoted in a string
        f"card_number={PAN}; cvc={CVV}",
        f"x\n  Extra inputs are not permitted [type=extra_forbidden, input_value='{CVV}', "
        "input_type=str]",
    ],
)
def test_redaction_of_free_text(text: str) -> None:
    out = redact(text)
    assert not leaks(out.text), out.text
    assert out.kinds


def test_text_without_card_data_is_kept_as_is() -> None:
    text = '{"id": "evt_4194986994504da1daa0004f", "amount": 12345, "note": "expand=1"}'
    assert redact(text) == (text, ())


def test_dead_letter_value_and_headers_are_redacted() -> None:
    value, kinds = dlq.redacted_value(HIDDEN)
    assert not leaks(value.decode())
    assert json.loads(value)["data"]["order_id"] == "ord_1"
    assert kinds == ("card_key",)
    assert dlq.redacted_value(b"{}") == (b"{}", ())
    rec = Record("t", 0, 1, b"k", HIDDEN, (("note", f"cvv={CVV}".encode()),), 0)
    exc = PermanentError("schema_violation", f"pan: {PAN}")
    headers = dlq.headers_for(rec, "g", exc, 1, datetime.now(UTC))
    assert not any(leaks(v.decode()) for _, v in headers)


# --- error texts -------------------------------------------------------------------


EXAMPLE = Path(__file__).parents[2] / "schemas" / "examples" / "OrderPlaced.json"


def order_placed_with_card_data() -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(EXAMPLE.read_text())
    envelope["payload"].update(cvv=CVV, card_number=PAN)  # extra fields: forbidden
    return envelope


def test_payments_schema_violation_names_the_fields_never_the_values() -> None:
    with pytest.raises(PermanentError) as raised:
        _validate(OrderPlaced, order_placed_with_card_data()["payload"])
    message = str(raised.value)
    assert message == (
        "schema_violation: OrderPlaced: cvv (Extra inputs are not permitted); "
        "card_number (Extra inputs are not permitted)"
    )


def test_orders_schema_violation_uses_the_same_message() -> None:
    with pytest.raises(PermanentError) as raised:
        SagaEvent.parse(order_placed_with_card_data())
    assert "cvv (Extra inputs are not permitted)" in str(raised.value)
    assert not leaks(str(raised.value))


def test_runtime_error_texts_never_carry_card_data() -> None:
    # handlers of other services let pydantic's ValidationError (which quotes inputs) out
    with pytest.raises(ValidationError) as raised:
        OrderPlaced.model_validate(order_placed_with_card_data()["payload"])
    assert leaks(str(raised.value))
    assert not leaks(describe(raised.value))
    assert "cvv" in describe(raised.value)


def test_schema_violation_texts_survive_the_runtime_redaction() -> None:
    with pytest.raises(PermanentError) as raised:
        _validate(OrderPlaced, order_placed_with_card_data()["payload"])
    assert describe(raised.value) == str(raised.value)


def test_log_lines_and_tracebacks_are_redacted() -> None:
    try:
        raise ValueError(f"bad record {{'cvv': '{CVV}', 'pan': '{PAN}'}}")
    except ValueError:
        info = sys.exc_info()
    for formatter in (JsonFormatter("unit"), TextFormatter("unit")):
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "card %s", (PAN,), info)
        line = formatter.format(record)
        assert "Traceback" in line
        assert not leaks(line)


# --- identifier fields (docs/contract.md §2.2) ---------------------------------------------


def with_check_digit(body: str) -> str:
    """``body`` and the digit that makes it Luhn-valid: an all-digit id that looks like a
    card number to a scan (snowflake-style ids are 18-19 digits)."""
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


ORDER_ID = with_check_digit("731945108226519405")  # 19 digits, Luhn-valid


def test_an_all_digit_luhn_valid_id_is_an_identifier_not_a_card_number() -> None:
    assert contains_pan(ORDER_ID)  # as free text it is indistinguishable from a PAN
    webhook = {
        "id": ORDER_ID,
        "data": {
            "order_id": ORDER_ID,
            "payment_intent_id": ORDER_ID,
            "transaction_id": int(ORDER_ID),
            "items": [{"sku": ORDER_ID, "quantity": 1}],
            "payment_method": {"type": "card", "brand": "visa", "last4": "4242"},
        },
    }
    assert find_card_data(webhook) is None
    assert find_card_data_in_bytes(json.dumps(webhook).encode()) is None
    AuditRecorded.model_validate(
        {"subject": "order", "action": "a", "outcome": "o", "reason": None,
         "order_id": ORDER_ID, "details": {"record_key": ORDER_ID, "customer_id": ORDER_ID}}
    )  # fmt: skip


@pytest.mark.parametrize(
    "data",
    [
        {"order_id": ORDER_ID, "payment_method": {"type": "card", "number": PAN}},
        {
            "order_id": ORDER_ID,
            "failure_message": f"card {PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}",
        },
        {"order_id": ORDER_ID, "note": ORDER_ID},  # the same number, not in an id field
        {"order_id": {"number": PAN}},  # an id field holds a scalar: a container is scanned
        {"order_id": [PAN]},
        {"paid": "id: " + PAN},
        {"ids": PAN, "order_ids": PAN, "identifier": PAN, "Order_ID": PAN, "skus": PAN},
        {PAN: "order_id"},  # keys are scanned
    ],
)
def test_every_other_value_is_still_scanned(data: dict[str, Any]) -> None:
    assert find_card_data(data) == CARD_NUMBER_PRESENT
    assert find_card_data_in_bytes(json.dumps({"data": data}).encode()) == CARD_NUMBER_PRESENT


#: another script's digits: U+0660..U+0669
ARABIC_INDIC = str.maketrans("0123456789", "".join(chr(0x660 + d) for d in range(10)))


@pytest.mark.parametrize(
    ("data", "found"),
    [
        ({"order_id": "4111111111111111"}, None),
        ({"order_id": "ord_4111111111111111"}, None),
        ({"order_id": "4111 1111 1111 1111"}, CARD_NUMBER_PRESENT),
        ({"order_id": "4111-1111-1111-1111"}, CARD_NUMBER_PRESENT),
        ({"order_id": "ref 4111111111111111"}, CARD_NUMBER_PRESENT),
        ({"order_id": "4111111111111111".translate(ARABIC_INDIC)}, CARD_NUMBER_PRESENT),
        ({"orderId": "4111111111111111"}, CARD_NUMBER_PRESENT),
        ({"ORDER_ID": "4111111111111111"}, CARD_NUMBER_PRESENT),
        *(({k: "4111111111111111"}, CARD_NUMBER_PRESENT) for k in ("card_id", "pan_id")),
        *(({k: "4111111111111111"}, CARD_NUMBER_PRESENT) for k in ("card_number_id", "cvv_id")),
    ],
)
def test_the_identifier_rule_is_what_docs_contract_says(
    data: dict[str, Any], found: str | None
) -> None:
    """The examples of docs/contract.md §2.2: only an opaque id is exempt."""
    assert find_card_data(data) == found


def test_the_audit_model_still_refuses_a_card_number_outside_its_identifiers() -> None:
    audit = {"subject": "s", "action": "a", "outcome": "o", "reason": None}
    with pytest.raises(ValidationError):
        AuditRecorded.model_validate({**audit, "details": {"record": ORDER_ID}})
    with pytest.raises(ValidationError):
        AuditRecorded.model_validate({**audit, "subject": PAN})
    assert find_card_data({"record_key": PAN}) == CARD_NUMBER_PRESENT  # only for the model


def test_card_data_keys_are_rejected_under_an_id_field_too() -> None:
    assert find_card_data({"order_id": ORDER_ID, "x_id": {"cvv": "1"}}) == SECURITY_CODE_PRESENT
    assert find_card_data({"pan_id": "a", "card_id": "b"}) is None  # ids, not card keys


def test_a_non_json_body_has_no_fields_and_is_scanned_whole() -> None:
    assert find_card_data_in_bytes(f"order_id={ORDER_ID}".encode()) == CARD_NUMBER_PRESENT


def test_redaction_keeps_identifier_fields_of_a_json_document_intact() -> None:
    """A dead-lettered or parked record keeps its ids (operators search by them; a replay
    of an OrderPlaced must still name its order, a replayed confirmation must still
    verify): exactly the fields the acceptance rule does not scan."""
    body = (
        f'{{"event_id": "e", "payload": {{"order_id": "{ORDER_ID}", "customer_id": {ORDER_ID},'
        f' "items": [{{"sku": "{ORDER_ID}"}}], "note": "card {PAN}", "other": "{ORDER_ID}"}}}}'
    )
    out = redact(body)
    assert out.text == (
        f'{{"event_id": "e", "payload": {{"order_id": "{ORDER_ID}", "customer_id": {ORDER_ID},'
        f' "items": [{{"sku": "{ORDER_ID}"}}], "note": "card [REDACTED-PAN]",'
        ' "other": "[REDACTED-PAN]"}}'
    )
    assert out.kinds == ("card_number",)
    assert redact(f'{{"order_id": "{ORDER_ID}"}}') == (f'{{"order_id": "{ORDER_ID}"}}', ())
    value, kinds = dlq.redacted_value(f'{{"data": {{"order_id": "{ORDER_ID}"}}}}'.encode())
    assert (json.loads(value)["data"]["order_id"], kinds) == (ORDER_ID, ())


def test_redaction_of_an_id_field_holding_a_card_key_or_container_still_masks() -> None:
    out = redact(f'{{"order_id": {{"pan": "{PAN}", "n": "{PAN}"}}, "x_id": ["{PAN}"]}}')
    assert not leaks(out.text), out.text


def test_free_text_has_no_fields_every_card_like_number_is_masked() -> None:
    """Log lines and error texts: a number there cannot be told from a PAN an exception
    quoted, so a Luhn-valid id in free text is masked too (its record, key and status
    show it intact)."""
    for text in (f"order {ORDER_ID}: holding", f"order_id={ORDER_ID}", f"{{'order_id': {PAN}}}"):
        out = redact(text)
        assert ORDER_ID not in out.text, out.text
        assert PAN not in out.text, out.text
        assert out.kinds == ("card_number",)


GROUPED = f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"
ARABIC_PAN = PAN.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))


@pytest.mark.parametrize(
    "data",
    [
        # a key naming a card is no identifier of ours, whatever its suffix
        {"payment_method": {"type": "card", "card_id": PAN}},
        {"payment_method": {"pan_id": int(PAN)}},
        {"card_number_id": PAN},
        {"data": {"Card-Token_id": PAN}},
        # an identifier is one token: digits grouped as a card number is typed are a PAN
        {"order_id": GROUPED},
        {"x_id": PAN.replace("1111", "1111-", 2).rstrip("-")},
        {"id": f"{PAN[:4]}-{PAN[4:8]}-{PAN[8:12]}-{PAN[12:]}"},
        {"data": {"x_id": f"ref {PAN}"}},
        # digits of another script are digits (int() reads them)
        {"note": ARABIC_PAN},
        {"order_id": " ".join(ARABIC_PAN[i : i + 4] for i in range(0, 16, 4))},
    ],
)
def test_an_identifier_field_does_not_hide_a_card_number(data: dict[str, Any]) -> None:
    assert find_card_data(data) == CARD_NUMBER_PRESENT
    assert find_card_data_in_bytes(json.dumps({"data": data}).encode()) == CARD_NUMBER_PRESENT
    assert find_card_data_in_bytes(json.dumps(data, ensure_ascii=False).encode()) == (
        CARD_NUMBER_PRESENT
    )
    out = redact(json.dumps(data, ensure_ascii=False))
    assert "card_number" in out.kinds, out.text
    assert not contains_pan(out.text), out.text


def test_an_all_digit_id_in_any_identifier_field_stays_an_identifier() -> None:
    data = {"order_id": ORDER_ID, "x_id": ORDER_ID, "id": int(ORDER_ID), "sku": ORDER_ID}
    assert find_card_data({"data": data}) is None
    assert redact(json.dumps(data)) == (json.dumps(data), ())
    assert find_card_data({"card_id": "card_1MzQ4111111111111111", "pan_id": "tok_x"}) is None


def test_redaction_masks_a_card_number_spelt_with_json_escapes() -> None:
    """The acceptance rule reads the parsed document, so ``"\\u0034111…"`` is a PAN to
    it; a dead letter or parked record must not keep it either."""
    escaped = "\\u0034" + PAN[1:]
    body = f'{{"order_id": "{ORDER_ID}", "note": "{escaped}", "lines": ["x {escaped}"]}}'
    assert find_card_data_in_bytes(body.encode()) == CARD_NUMBER_PRESENT
    out = redact(body)
    assert find_card_data(json.loads(out.text)) is None, out.text
    assert json.loads(out.text)["order_id"] == ORDER_ID
    assert out.kinds == ("card_number",)
