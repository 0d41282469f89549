"""Payload models of the external contract (docs/contract.md §2 and §3).

Models of events paysaga or checkout define forbid unknown fields and require every
field without a default: docs/contract.md §1 makes unknown or missing payload fields a
validation error. The gateway webhook is the gateway's format, so its models ignore
fields they do not know. Integers are strict (no "5" -> 5, no 5.0 -> 5, no bools):
amounts are money in minor units and must arrive as JSON integers.
"""

import re
from enum import StrEnum
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

__all__ = [
    "ISO_4217_CODES",
    "Amount",
    "ContractModel",
    "Currency",
    "CustomerNotificationRequested",
    "GatewayEventType",
    "GatewayPaymentData",
    "GatewayPaymentMethod",
    "GatewayWebhook",
    "Id64",
    "MinorUnits",
    "NotificationKind",
    "OrderId",
    "OrderItem",
    "OrderPlaced",
    "OrderStatus",
    "OrderStatusChanged",
    "PaymentRequested",
    "PaymentRetryRequested",
    "ReasonCode",
    "Sku",
    "StockLevelSet",
]

# ISO 4217 list one (current codes, funds and special codes), as published mid-2025:
# XCG replaced ANG, ZWG replaced ZWL, SLE replaced SLL; HRK and CUC are withdrawn.
# Embedded rather than fetched so validation is pure; update on ISO amendments.
ISO_4217_CODES: frozenset[str] = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL
    BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF
    DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG
    HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK
    LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN
    NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR
    SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY
    TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA
    XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XTS XUA XXX YER ZAR ZMW ZWG
    """.split()  # noqa: SIM905 -- a word table reads like ISO's list; 178 quoted lines would not
)

_ALPHA3 = re.compile(r"[A-Z]{3}")


def _iso_4217(value: str) -> str:
    if not _ALPHA3.fullmatch(value):
        raise ValueError(f"must be an ISO 4217 code of three upper-case letters, got {value!r}")
    if value not in ISO_4217_CODES:
        raise ValueError(f"{value!r} is not an active ISO 4217 currency code")
    return value


Currency = Annotated[
    str,
    AfterValidator(_iso_4217),
    WithJsonSchema(
        {"type": "string", "pattern": "^[A-Z]{3}$", "description": "Active ISO 4217 code"}
    ),
]
OrderId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Id64 = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Sku = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MinorUnits = Annotated[int, Strict(), Field(ge=0)]
"""A non-negative amount in minor units (cents)."""
Amount = Annotated[int, Strict(), Field(gt=0)]
"""An order's charged amount in minor units: always > 0 (docs/contract.md §2.1 total_amount)."""
ReasonCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
"""A short snake_case code (docs/contract.md §3.1 `reason`)."""

_REASON_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def reason_code(raw: str | None) -> str | None:
    """A gateway's failure code as the contract's snake_case reason ("Do-Not-Honor" →
    "do_not_honor"); codes that cannot be made one become `payment_declined`."""
    if raw is None:
        return None
    code = re.sub(r"[^a-z0-9]+", "_", raw.lower()).strip("_")[:64]
    return code if _REASON_CODE.fullmatch(code) else "payment_declined"


class ContractModel(BaseModel):
    """Base of every payload paysaga or checkout defines: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderStatus(StrEnum):
    """The order statuses of docs/contract.md §3.1."""

    PENDING_PAYMENT = "PENDING_PAYMENT"
    PAYMENT_AUTHORIZED = "PAYMENT_AUTHORIZED"
    INVENTORY_RESERVED = "INVENTORY_RESERVED"
    PAID_CONFIRMED = "PAID_CONFIRMED"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    REFUND_PENDING = "REFUND_PENDING"
    REFUNDED = "REFUNDED"
    NEEDS_RECONCILIATION = "NEEDS_RECONCILIATION"


# --- §2.1 checkout.orders.v1 -----------------------------------------------------


class OrderItem(ContractModel):
    sku: Sku
    quantity: Annotated[int, Strict(), Field(ge=1, le=1000)]
    unit_amount: MinorUnits


class OrderPlaced(ContractModel):
    """An order from checkout (docs/contract.md §2.1).

    Guarantees every §2.1 rule, including total_amount == sum(quantity*unit_amount)
    - discount_amount + delivery_fee + service_fee; the error names the expected and
    the given total.
    """

    order_id: OrderId
    customer_id: Id64
    conference_id: str | None = None
    currency: Currency
    items: list[OrderItem] = Field(min_length=1, max_length=100)
    discount_amount: MinorUnits = 0
    delivery_fee: MinorUnits = 0
    service_fee: MinorUnits = 0
    # Declared after the items and fees so the validator below can see them.
    total_amount: Amount
    #: absent: paysaga requests the payment from the gateway (docs/contract.md §3.7)
    payment_intent_id: Id64 | None = None
    payment_method: Annotated[str, StringConstraints(min_length=1, max_length=32)]

    @field_validator("total_amount")
    @classmethod
    def _total_matches_lines(cls, total: int, info: ValidationInfo) -> int:
        data = info.data
        parts = ("items", "discount_amount", "delivery_fee", "service_fee")
        # A part that failed its own validation is reported there; comparing against
        # it here would only add a misleading second error.
        if not all(part in data for part in parts):
            return total
        subtotal = sum(item.quantity * item.unit_amount for item in data["items"])
        expected = subtotal - data["discount_amount"] + data["delivery_fee"] + data["service_fee"]
        if total != expected:
            raise ValueError(
                "total_amount must equal sum(quantity*unit_amount) - discount_amount"
                f" + delivery_fee + service_fee: expected {expected}"
                f" ({subtotal} - {data['discount_amount']} + {data['delivery_fee']}"
                f" + {data['service_fee']}), given {total}"
            )
        return total


class PaymentRetryRequested(ContractModel):
    """A new payment attempt for an order in PAYMENT_FAILED (docs/contract.md §2.1); without a
    payment_intent_id, paysaga requests the new payment (§3.7)."""

    order_id: OrderId
    payment_intent_id: Id64 | None = None
    payment_method: Annotated[str, StringConstraints(min_length=1, max_length=32)]


# --- §2.3 catalog.stock.v1 -------------------------------------------------------


class StockLevelSet(ContractModel):
    """Sets the sellable quantity of a SKU (docs/contract.md §2.3); record key is the sku."""

    sku: Sku
    available: MinorUnits


# --- §3.1 orders.status.v1 and §3.3 customer.notifications.v1 ----------------------


class OrderStatusChanged(ContractModel):
    """One change of an order's status. `version` is 1 for the first status of an
    order and increases by exactly one per change, so consumers can drop stale ones."""

    order_id: OrderId
    status: OrderStatus
    previous_status: OrderStatus | None
    reason: ReasonCode | None
    #: None while paysaga is still requesting the attempt's payment (docs/contract.md §3.7)
    payment_intent_id: Id64 | None
    transaction_id: str | None
    amount: Amount
    currency: Currency
    version: Annotated[int, Strict(), Field(ge=1)]


class NotificationKind(StrEnum):
    PAYMENT_CONFIRMED = "payment_confirmed"
    PAYMENT_FAILED = "payment_failed"
    OUT_OF_STOCK = "out_of_stock"
    REFUNDED = "refunded"


class CustomerNotificationRequested(ContractModel):
    """One customer-facing outcome of a payment attempt (docs/contract.md §3.3)."""

    order_id: OrderId
    customer_id: Id64
    kind: NotificationKind
    status: OrderStatus
    reason: ReasonCode | None
    amount: Amount
    currency: Currency


# --- §3.7 payments.requests.v1 ------------------------------------------------------


class PaymentRequested(ContractModel):
    """The payment paysaga requested from the gateway for an order (or retry) that came
    without a payment_intent_id (docs/contract.md §3.7). ``client_secret`` lets the checkout send
    the customer to the gateway's payment page; it appears on payments.requests.v1 only."""

    order_id: OrderId
    payment_intent_id: Id64
    amount: Amount
    currency: Currency
    payment_method: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    client_secret: Annotated[str, StringConstraints(min_length=1)]
    expires_at: str | None


# --- §2.2 gateway webhook body (the gateway's format, no envelope) ------------------


class GatewayEventType(StrEnum):
    PAYMENT_AUTHORIZED = "payment.authorized"
    PAYMENT_CAPTURED = "payment.captured"
    PAYMENT_FAILED = "payment.failed"


class _GatewayModel(BaseModel):
    # The gateway owns this format and may add fields at any time; ignoring them
    # keeps a harmless addition from rejecting genuine confirmations.
    model_config = ConfigDict(extra="ignore", frozen=True)


class GatewayPaymentMethod(_GatewayModel):
    type: str = Field(min_length=1)
    brand: str | None = None
    last4: str | None = None


class GatewayPaymentData(_GatewayModel):
    transaction_id: str = Field(min_length=1)
    payment_intent_id: str = Field(min_length=1)
    order_id: str | None = None
    amount: Annotated[int, Strict()]
    # Not checked against ISO 4217 here: a confirmation is rejected when its currency
    # differs from the order's, and that comparison gives the precise reason.
    currency: str
    payment_method: GatewayPaymentMethod
    failure_code: str | None = None
    failure_message: str | None = None


class GatewayWebhook(_GatewayModel):
    """The gateway's webhook body (docs/contract.md §2.2).

    Unknown fields are dropped on validation, so this model cannot see card data the
    body may carry: scan the raw bytes for it before (and independently of) parsing.
    """

    id: str = Field(min_length=1)
    type: GatewayEventType
    created: Annotated[int, Strict()]
    data: GatewayPaymentData
