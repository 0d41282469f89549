"""The chaos check's card scan reads what a row or record holds, not its encoding:
a bytea column as bytes (not its hex text), a traceparent as the random ids it is."""

from __future__ import annotations

import json

from schemas.carddata import CARD_NUMBER_PRESENT, find_card_data_in_bytes
from tests.support.invariants import _scan_value, _scanned_headers, _scanned_value

# a span id that happens to be all digits and Luhn-valid (seen in a chaos run)
TRACEPARENT = "00-1f179ca993c03e725e8850dfdaf75588-6959472987523981-01"
PAN = "4242424242424242"


def _row(value: dict[str, object], headers: list[list[str]]) -> dict[str, object]:
    """An outbox row as ``row_to_json`` gives it: bytea as ``\\x`` hex text."""
    return {
        "id": 629,
        "topic": "orders.status.v1",
        "key": "\\x" + b"ord_1".hex(),
        "value": "\\x" + json.dumps(value).encode().hex(),
        "headers": headers,
        "traceparent": TRACEPARENT,
    }


def test_a_traceparent_with_an_all_digit_span_id_is_no_card_number() -> None:
    row = _row({"status": "PENDING_PAYMENT"}, [["traceparent", TRACEPARENT]])
    assert _scan_value(row) is None
    assert _scanned_headers([("traceparent", TRACEPARENT.encode())]) == []


def test_a_card_number_in_a_header_value_or_column_is_found() -> None:
    assert _scan_value(_row({"status": "x"}, [["x-note", PAN]])) == CARD_NUMBER_PRESENT
    assert _scan_value(_row({"note": PAN}, [])) == CARD_NUMBER_PRESENT
    # a traceparent header that is not one is scanned like any header
    assert _scan_value(_row({"status": "x"}, [["traceparent", PAN]])) == CARD_NUMBER_PRESENT
    assert _scan_value({"id": 1, "comment": PAN}) == CARD_NUMBER_PRESENT


def test_an_audit_rows_all_digit_record_key_is_an_order_id_not_a_card_number() -> None:
    """The audit's ``record_key`` is the key a rejected record came with (an order id,
    which may be all digits and Luhn-valid): exempt as the audit model exempts it; a card
    number elsewhere in the same row is still found."""
    details = {"record": "gateway.confirmations.v1/2/17", "record_key": PAN}
    row = {"id": 3, "action": "confirmation", "outcome": "rejected", "details": details}
    assert _scan_value(row) is None
    assert _scan_value({**row, "details": {**details, "note": PAN}}) == CARD_NUMBER_PRESENT
    assert _scan_value({**row, "details": {"record_key": "4242 4242 4242 4242"}}) == (
        CARD_NUMBER_PRESENT  # digits grouped as a card number is typed: no identifier
    )


def test_a_records_traceparent_field_with_an_all_digit_span_id_is_no_card_number() -> None:
    """The monitor's changelog keeps each order's last trace in its row; a card number
    elsewhere in such a record is still found, and so is a traceparent field that is not
    one."""
    row = {"status": "INVENTORY_RESERVED", "since": 1.5, "traceparent": TRACEPARENT}
    assert find_card_data_in_bytes(_scanned_value(json.dumps(row).encode())) is None
    assert find_card_data_in_bytes(_scanned_value(json.dumps({**row, "note": PAN}).encode()))
    assert find_card_data_in_bytes(_scanned_value(json.dumps({"traceparent": PAN}).encode()))
    assert find_card_data_in_bytes(_scanned_value(PAN.encode()))  # not JSON: as it is
