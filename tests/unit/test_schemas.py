"""The schemas package: examples, schema drift, docs/contract.md §2.1 rules, round trips."""

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import EVENT_TYPES, Envelope, dump, generate, new_envelope, parse_event, parse_payload
from schemas.contract import ISO_4217_CODES, GatewayEventType, GatewayWebhook, OrderPlaced
from schemas.events import AuditRecorded

EXAMPLES = Path(generate.__file__).resolve().parent / "examples"
NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    return data


def order_payload() -> dict[str, Any]:
    return copy.deepcopy(load("OrderPlaced.json")["payload"])


# --- examples and generated schemas ----------------------------------------------


def test_every_contract_event_and_webhook_type_has_an_example() -> None:
    names = {path.name for path in EXAMPLES.glob("*.json")}
    contract_events = {
        "OrderPlaced",
        "PaymentRetryRequested",
        "StockLevelSet",
        "OrderStatusChanged",
        "CustomerNotificationRequested",
    }
    webhooks = {f"gateway-webhook-{t.value.split('.')[1]}.json" for t in GatewayEventType}
    assert {f"{name}.json" for name in contract_events} | webhooks <= names


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda path: path.stem)
def test_example_validates(path: Path) -> None:
    raw = path.read_bytes()
    if path.name.startswith("gateway-webhook-"):
        webhook = GatewayWebhook.model_validate_json(raw)
        assert webhook.type.value == "payment." + path.stem.removeprefix("gateway-webhook-")
        return
    envelope, payload = parse_event(raw)
    assert envelope.event_type == path.stem
    assert type(payload) is EVENT_TYPES[path.stem]
    # The example survives a re-dump unchanged in meaning.
    assert parse_event(dump(envelope)) == (envelope, payload)


def test_committed_json_schemas_have_no_drift() -> None:
    assert generate.check() == []


def test_drift_check_reports_changed_missing_and_stale_files(tmp_path: Path) -> None:
    generate.write(tmp_path)
    assert generate.check(tmp_path) == []
    (tmp_path / "OrderPlaced.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "SagaStalled.json").unlink()
    (tmp_path / "Removed.json").write_text("{}\n", encoding="utf-8")
    assert generate.check(tmp_path) == ["OrderPlaced.json", "Removed.json", "SagaStalled.json"]


def test_registry_covers_every_event_type() -> None:
    assert set(EVENT_TYPES) == {
        # contract
        "OrderPlaced",
        "PaymentRetryRequested",
        "StockLevelSet",
        "OrderStatusChanged",
        "CustomerNotificationRequested",
        "PaymentRequested",
        # docs/saga-events.md
        "OrderRegistered",
        "PaymentRetryAccepted",
        "PaymentAccepted",
        "PaymentDeclined",
        "OrderFlaggedForReconciliation",
        "PaymentIntentCreated",
        "PaymentRequestRefused",
        "PaymentRequestFailed",
        "StockReserved",
        "StockReservationFailed",
        "StockReleased",
        "StockCommitted",
        "PaymentCaptured",
        "SaleConfirmed",
        "CaptureDeclined",
        "AuthorizationExpired",
        "CaptureFailed",
        "AuthorizationVoided",
        "RefundSucceeded",
        "CompensationFailed",
        "AuditRecorded",
        "SagaStalled",
    }
    # new_envelope relies on every model being named after its event type.
    assert all(model.__name__ == name for name, model in EVENT_TYPES.items())


def test_unknown_event_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown event_type 'OrderTeleported'"):
        parse_payload("OrderTeleported", {})


def test_currency_list_holds_active_codes_only() -> None:
    assert all(re.fullmatch(r"[A-Z]{3}", code) for code in ISO_4217_CODES)
    assert {"EUR", "USD", "JPY", "CHF", "XCG", "ZWG", "SLE", "VED", "VES"} <= ISO_4217_CODES
    assert not {"HRK", "CUC", "ZWL", "VEF", "MRO", "STD", "BYR", "LTL", "DEM"} & ISO_4217_CODES


# --- docs/contract.md §2.1 rules ---------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def set_field(field: str, value: Any) -> Mutation:
    def mutate(payload: dict[str, Any]) -> None:
        payload[field] = value

    return mutate


def set_item(field: str, value: Any) -> Mutation:
    def mutate(payload: dict[str, Any]) -> None:
        payload["items"][0][field] = value

    return mutate


def drop(field: str) -> Mutation:
    def mutate(payload: dict[str, Any]) -> None:
        del payload[field]

    return mutate


ITEM = {"sku": "TICKET", "quantity": 1, "unit_amount": 100}


@pytest.mark.parametrize(
    ("mutate", "loc", "message"),
    [
        pytest.param(
            set_field("order_id", "ord 1/2"), ("order_id",), "should match pattern", id="order_id"
        ),
        pytest.param(
            set_field("order_id", "o" * 65), ("order_id",), "should match pattern", id="order_id-65"
        ),
        pytest.param(
            set_field("currency", "eur"),
            ("currency",),
            "three upper-case letters, got 'eur'",
            id="currency-lower",
        ),
        pytest.param(
            set_field("currency", "XXQ"),
            ("currency",),
            "'XXQ' is not an active ISO 4217 currency code",
            id="currency-unknown",
        ),
        pytest.param(set_field("items", []), ("items",), "at least 1 item", id="items-0"),
        pytest.param(
            set_field("items", [ITEM] * 101), ("items",), "at most 100 items", id="items-101"
        ),
        pytest.param(
            set_item("quantity", 0), ("items", 0, "quantity"), "greater than or equal to 1", id="q0"
        ),
        pytest.param(
            set_item("quantity", 1001),
            ("items", 0, "quantity"),
            "less than or equal to 1000",
            id="q1001",
        ),
        pytest.param(
            set_item("quantity", "2"), ("items", 0, "quantity"), "valid integer", id="q-string"
        ),
        pytest.param(
            set_item("unit_amount", -1),
            ("items", 0, "unit_amount"),
            "greater than or equal to 0",
            id="unit_amount-negative",
        ),
        pytest.param(
            set_item("sku", ""), ("items", 0, "sku"), "at least 1 character", id="sku-empty"
        ),
        pytest.param(
            set_field("discount_amount", -5),
            ("discount_amount",),
            "greater than or equal to 0",
            id="discount-negative",
        ),
        pytest.param(
            set_field("total_amount", 10000),
            ("total_amount",),
            "expected 10345 (10500 - 500 + 0 + 345), given 10000",
            id="total-mismatch",
        ),
        pytest.param(
            set_field("total_amount", 0), ("total_amount",), "greater than 0", id="total-zero"
        ),
        pytest.param(
            set_field("coupon", "XMAS"), ("coupon",), "Extra inputs are not permitted", id="extra"
        ),
        pytest.param(drop("payment_method"), ("payment_method",), "Field required", id="missing"),
        pytest.param(
            set_field("payment_method", "c" * 33),
            ("payment_method",),
            "at most 32 characters",
            id="payment_method-33",
        ),
        pytest.param(
            set_field("customer_id", ""), ("customer_id",), "at least 1 character", id="customer"
        ),
    ],
)
def test_order_rule_violation_is_rejected_naming_the_field(
    mutate: Mutation, loc: tuple[str | int, ...], message: str
) -> None:
    payload = order_payload()
    mutate(payload)
    with pytest.raises(ValidationError) as excinfo:
        parse_payload("OrderPlaced", payload)
    errors = excinfo.value.errors()
    assert [error["loc"] for error in errors] == [loc]
    assert message in errors[0]["msg"]
    assert str(loc[0]) in str(excinfo.value)


def test_fees_default_to_zero_and_count_in_the_total() -> None:
    payload = order_payload()
    for fee in ("discount_amount", "delivery_fee", "service_fee"):
        del payload[fee]
    payload["total_amount"] = 10500
    order = parse_payload("OrderPlaced", payload)
    assert isinstance(order, OrderPlaced)
    assert (order.discount_amount, order.delivery_fee, order.service_fee) == (0, 0, 0)


# --- envelope ---------------------------------------------------------------------


def test_extra_envelope_fields_are_ignored() -> None:
    record = load("OrderPlaced.json")
    record["producer"] = "checkout-7"
    record["trace"] = {"span": "x"}
    envelope, payload = parse_event(json.dumps(record))
    assert envelope.event_id == record["event_id"]
    assert "producer" not in json.loads(dump(envelope))
    assert isinstance(payload, OrderPlaced)


def test_occurred_at_is_normalised_to_utc_with_trailing_z() -> None:
    record = load("StockLevelSet.json")
    record["occurred_at"] = "2026-11-01T10:30:00+02:00"
    raw = dump(record)
    assert b'"occurred_at":"2026-11-01T08:30:00Z"' in raw
    assert Envelope.model_validate_json(raw).occurred_at == datetime(2026, 11, 1, 8, 30, tzinfo=UTC)


def test_naive_occurred_at_is_rejected() -> None:
    record = load("StockLevelSet.json")
    record["occurred_at"] = "2026-11-01T10:30:00"
    with pytest.raises(ValidationError, match="occurred_at"):
        Envelope.model_validate(record)


def test_new_envelope_is_pure_and_carries_saga_fields() -> None:
    order = OrderPlaced.model_validate(order_payload())
    kwargs: dict[str, Any] = {
        "now": datetime(2026, 11, 22, 11, 0, tzinfo=timezone(timedelta(hours=1))),
        "event_id": "e-1",
        "correlation_id": "c-1",
        "causation_id": "e-0",
        "saga_seq": 2,
    }
    first = new_envelope("OrderPlaced", order, **kwargs)
    assert first == new_envelope("OrderPlaced", order, **kwargs)
    assert first["occurred_at"] == "2026-11-22T10:00:00Z"
    assert (first["causation_id"], first["saga_seq"]) == ("e-0", 2)
    assert first["payload"] == order_payload()
    # Compact JSON in the envelope's field order.
    assert dump(first) == json.dumps(first, separators=(",", ":")).encode()


def test_new_envelope_rejects_a_payload_of_another_type() -> None:
    order = OrderPlaced.model_validate(order_payload())
    with pytest.raises(ValueError, match="'StockLevelSet' does not match payload model"):
        new_envelope("StockLevelSet", order, now=NOW, event_id="e-1")


def test_gateway_webhook_tolerates_unknown_fields() -> None:
    body = load("gateway-webhook-authorized.json")
    body["livemode"] = False
    body["data"]["risk_score"] = 12
    body["data"]["payment_method"]["funding"] = "credit"
    webhook = GatewayWebhook.model_validate(body)
    assert webhook.data.amount == 10345
    assert webhook.data.payment_method.last4 == "4242"


def test_audit_record_refuses_card_data() -> None:
    base = {"subject": "gateway_confirmation", "action": "verify", "outcome": "rejected"}
    ok = AuditRecorded.model_validate({**base, "reason": "card_data", "details": {"n": 1}})
    assert ok.details == {"n": 1}
    with pytest.raises(ValidationError, match="security-code key"):
        AuditRecorded.model_validate({**base, "reason": None, "details": {"cvv": "123"}})
    with pytest.raises(ValidationError, match="must not carry card data"):
        AuditRecorded.model_validate(
            {**base, "reason": None, "details": {"body": "card 4242424242424242"}}
        )


# --- property: any valid order round-trips -------------------------------------

ids = st.text(min_size=1, max_size=64)


@st.composite
def orders(draw: st.DrawFn) -> OrderPlaced:
    lines = draw(
        st.lists(
            st.tuples(ids, st.integers(1, 1000), st.integers(0, 10**6)), min_size=1, max_size=100
        )
    )
    delivery, service = draw(st.integers(0, 10**4)), draw(st.integers(0, 10**4))
    gross = sum(quantity * unit_amount for _, quantity, unit_amount in lines) + delivery + service
    assume(gross > 0)
    discount = draw(st.integers(0, gross - 1))
    return OrderPlaced.model_validate(
        {
            "order_id": draw(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)),
            "customer_id": draw(ids),
            "conference_id": draw(st.none() | ids),
            "currency": draw(st.sampled_from(sorted(ISO_4217_CODES))),
            "items": [
                {"sku": sku, "quantity": quantity, "unit_amount": unit_amount}
                for sku, quantity, unit_amount in lines
            ],
            "discount_amount": discount,
            "delivery_fee": delivery,
            "service_fee": service,
            "total_amount": gross - discount,
            "payment_intent_id": draw(ids),
            "payment_method": draw(st.text(min_size=1, max_size=32)),
        }
    )


@given(
    order=orders(),
    now=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    event_id=ids,
)
def test_any_valid_order_round_trips_through_dump_and_parse(
    order: OrderPlaced, now: datetime, event_id: str
) -> None:
    raw = dump(new_envelope("OrderPlaced", order, now=now, event_id=event_id))
    envelope, payload = parse_event(raw)
    assert payload == order
    assert (envelope.event_id, envelope.occurred_at) == (event_id, now)
    assert json.loads(raw)["occurred_at"].endswith("Z")
