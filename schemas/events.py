"""Internal saga events (docs/saga-events.md) and the registry of every event type.

Every saga payload that follows an accepted payment inherits `PaymentContext`, so a
consumer never needs another service's database. All models forbid unknown fields.
"""

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, Field, Strict, model_validator

from schemas.carddata import find_card_data
from schemas.contract import (
    Amount,
    ContractModel,
    Currency,
    CustomerNotificationRequested,
    Id64,
    OrderId,
    OrderPlaced,
    OrderStatus,
    OrderStatusChanged,
    PaymentRequested,
    PaymentRetryRequested,
    ReasonCode,
    Sku,
    StockLevelSet,
)
from schemas.envelope import Envelope, event_type_of

__all__ = [
    "EVENT_TYPES",
    "AuditRecorded",
    "AuthorizationExpired",
    "AuthorizationVoided",
    "CaptureDeclined",
    "CaptureFailed",
    "CompensationFailed",
    "OrderFlaggedForReconciliation",
    "OrderRegistered",
    "PaymentAccepted",
    "PaymentCaptured",
    "PaymentContext",
    "PaymentDeclined",
    "PaymentIntentCreated",
    "PaymentRequestContext",
    "PaymentRequestFailed",
    "PaymentRequestRefused",
    "PaymentRetryAccepted",
    "RefundSucceeded",
    "SagaStalled",
    "SaleConfirmed",
    "StockCommitted",
    "StockItem",
    "StockReleased",
    "StockReservationFailed",
    "StockReserved",
    "parse_event",
    "parse_payload",
]

Attempt = Annotated[int, Strict(), Field(ge=1)]
"""1 for an order's first payment attempt, +1 per accepted PaymentRetryRequested."""
NonEmpty = Annotated[str, Field(min_length=1)]


class PaymentContext(ContractModel):
    """What every saga step needs to know about the accepted payment it works on."""

    order_id: OrderId
    attempt: Attempt
    payment_intent_id: Id64
    transaction_id: NonEmpty
    flow: Literal["authorization", "sale"] = Field(
        description="authorization: capture needed; sale: already charged"
    )
    amount: Amount
    currency: Currency
    gateway: Id64


class StockItem(ContractModel):
    sku: Sku
    # No upper bound: lines of the same SKU may be merged into one item.
    quantity: Annotated[int, Strict(), Field(ge=1)]


Items = Annotated[list[StockItem], Field(min_length=1)]


# --- payments.events.v1 ----------------------------------------------------------


class OrderRegistered(ContractModel):
    order_id: OrderId
    attempt: Attempt
    customer_id: Id64
    amount: Amount
    currency: Currency
    #: None: payments requests the attempt's payment (PaymentIntentCreated follows)
    payment_intent_id: Id64 | None
    #: the checkout's conference_id (OrderPlaced), for the operator console's filter;
    #: None on a retry (the order keeps the one it was registered with)
    conference_id: str | None = None  # as OrderPlaced has it (no length rule there)


class PaymentRetryAccepted(OrderRegistered):
    payment_method: Annotated[str, Field(min_length=1, max_length=32)]


class PaymentAccepted(PaymentContext):
    customer_id: Id64
    items: Items
    payment_method_type: NonEmpty
    brand: str | None
    last4: str | None


class PaymentDeclined(ContractModel):
    order_id: OrderId
    attempt: Attempt
    customer_id: Id64
    payment_intent_id: Id64
    transaction_id: NonEmpty
    amount: Amount
    currency: Currency
    # The gateway's own codes: not necessarily snake_case, and may be absent.
    failure_code: str | None
    failure_message: str | None


class PaymentRequestContext(ContractModel):
    """What a payment request (docs/contract.md §3.7) needs and its events carry: the attempt
    that came without a payment_intent_id."""

    order_id: OrderId
    attempt: Attempt
    amount: Amount
    currency: Currency
    payment_method: Annotated[str, Field(min_length=1, max_length=32)]


class PaymentIntentCreated(ContractModel):
    """The gateway created the attempt's payment; the order now waits for its
    confirmation. Never carries the client secret (that is PaymentRequested's alone)."""

    order_id: OrderId
    attempt: Attempt
    payment_intent_id: Id64


class PaymentRequestRefused(ContractModel):
    """The gateway refused the payment request (4xx): the attempt failed."""

    order_id: OrderId
    attempt: Attempt
    #: the gateway's error code as given (not necessarily snake_case)
    failure_code: NonEmpty
    failure_message: str | None


class PaymentRequestFailed(ContractModel):
    """The payment request could not be settled automatically (gateway unreachable past
    the retry budget): an operator must act."""

    order_id: OrderId
    attempt: Attempt
    reason: ReasonCode


class OrderFlaggedForReconciliation(ContractModel):
    order_id: OrderId
    attempt: Attempt
    reason: ReasonCode


# --- inventory.events.v1 ---------------------------------------------------------


class StockReserved(PaymentContext):
    items: Items


class StockReservationFailed(PaymentContext):
    short_skus: Annotated[list[Sku], Field(min_length=1)]


class StockReleased(PaymentContext):
    items: Items
    reason: ReasonCode


class StockCommitted(PaymentContext):
    items: Items


# --- capture.events.v1 -----------------------------------------------------------


class PaymentCaptured(PaymentContext):
    capture_id: NonEmpty


class SaleConfirmed(PaymentContext):
    pass


class CaptureDeclined(PaymentContext):
    decline_code: NonEmpty


class AuthorizationExpired(PaymentContext):
    pass


class CaptureFailed(PaymentContext):
    reason: ReasonCode


# --- refunds.events.v1 -----------------------------------------------------------


class AuthorizationVoided(PaymentContext):
    reason: Literal["out_of_stock", "capture_declined", "authorization_expired"]


class RefundSucceeded(PaymentContext):
    refund_id: NonEmpty
    reason: ReasonCode


class CompensationFailed(PaymentContext):
    action: Literal["void", "refund"]
    reason: ReasonCode


# --- audit.events.v1 -------------------------------------------------------------


#: audit ``details`` keys that hold an identifier under another name: the key a record
#: came with (an order id, which may be all digits and Luhn-valid), not a card number
AUDIT_IDENTIFIERS = ("record_key",)


class AuditRecorded(ContractModel):
    """A security or validation outcome worth keeping (stored by orders).

    Guarantee: never carries card data. A `details` key named cvv/cvc/card_number/pan
    or any Luhn-valid 13-19 digit number in a field is a validation error, so a
    careless producer fails loudly instead of persisting a PAN. Identifier fields are
    not card data (`schemas.carddata`), and neither is `details.record_key`: the
    record's Kafka key, an order id or payment intent id.
    """

    subject: NonEmpty
    action: NonEmpty
    outcome: NonEmpty
    reason: ReasonCode | None
    order_id: str | None = None
    transaction_id: str | None = None
    gateway_event_id: str | None = None
    # Flat on purpose: every value can be scanned for card data (``AUDIT_IDENTIFIERS``
    # hold an identifier under another name).
    details: dict[str, str | int | bool | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_card_data(self) -> Self:
        if find_card_data(self.model_dump(), identifiers=AUDIT_IDENTIFIERS) is not None:
            raise ValueError("must not carry card data (a card number or security-code key)")
        return self


# --- saga.stalled.v1 -------------------------------------------------------------


class SagaStalled(ContractModel):
    """An order has stayed in a non-final status longer than its deadline."""

    order_id: OrderId
    status: OrderStatus
    stalled_for_seconds: Annotated[int, Strict(), Field(ge=0)]
    deadline_seconds: Annotated[int, Strict(), Field(gt=0)]


# --- registry --------------------------------------------------------------------

EVENT_TYPES: dict[str, type[BaseModel]] = {
    event_type_of(model): model
    for model in (
        # contract (docs/contract.md §2, §3)
        OrderPlaced,
        PaymentRetryRequested,
        StockLevelSet,
        OrderStatusChanged,
        CustomerNotificationRequested,
        # payments.events.v1
        OrderRegistered,
        PaymentRetryAccepted,
        PaymentAccepted,
        PaymentDeclined,
        OrderFlaggedForReconciliation,
        PaymentIntentCreated,
        PaymentRequestRefused,
        PaymentRequestFailed,
        # payments.requests.v1 (contract §3.7)
        PaymentRequested,
        # inventory.events.v1
        StockReserved,
        StockReservationFailed,
        StockReleased,
        StockCommitted,
        # capture.events.v1
        PaymentCaptured,
        SaleConfirmed,
        CaptureDeclined,
        AuthorizationExpired,
        CaptureFailed,
        # refunds.events.v1
        AuthorizationVoided,
        RefundSucceeded,
        CompensationFailed,
        # audit.events.v1, saga.stalled.v1
        AuditRecorded,
        SagaStalled,
    )
}
"""Every enveloped event type -> its payload model; each model is named after its type."""


def parse_payload(event_type: str, payload: dict[str, Any]) -> BaseModel:
    """Validate `payload` as the model registered for `event_type`.

    Raises `ValueError` naming the type for an unregistered event type, and pydantic's
    `ValidationError` (a `ValueError`) naming each offending field otherwise.
    """
    model = EVENT_TYPES.get(event_type)
    if model is None:
        raise ValueError(f"unknown event_type {event_type!r}: no payload model is registered")
    return model.model_validate(payload)


def parse_event(raw: bytes | str) -> tuple[Envelope, BaseModel]:
    """Parse a record value into its envelope and validated payload (inverse of `dump`)."""
    envelope = Envelope.model_validate_json(raw)
    return envelope, parse_payload(envelope.event_type, envelope.payload)
