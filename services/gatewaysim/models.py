"""What the simulator's API takes (request bodies), what its ledger holds
(``Transaction``) and the shape of an answer (``Reply``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

Operation = Literal["capture", "void", "refund"]
TxnState = Literal["authorized", "captured", "voided", "refunded", "failed"]
#: an HTTP status and its JSON body
Reply = tuple[int, dict[str, Any]]


def error(status: int, code: str, message: str) -> Reply:
    return status, {"error": {"code": code, "message": message}}


class CaptureRequest(BaseModel):
    amount: int
    currency: str


class RefundRequest(CaptureRequest):
    reason: str


class PaymentIntentRequest(BaseModel):
    order_id: str = Field(min_length=1, max_length=64)
    amount: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    payment_method: str = Field(min_length=1, max_length=32)


class ConfirmRequest(BaseModel):
    mode: Literal["authorize", "sale", "decline"] = "authorize"
    deliver: bool = True


class SimPaymentRequest(BaseModel):
    order_id: str | None = None
    payment_intent_id: str = Field(min_length=1, max_length=64)
    amount: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    mode: Literal["authorize", "sale", "decline"]
    deliver: bool = True
    payment_method: dict[str, Any] = Field(
        default_factory=lambda: {"type": "card", "brand": "visa", "last4": "4242"}
    )
    #: Merged into the webhook's ``data`` last (tests inject bad content with it).
    extra_data: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Transaction:
    transaction_id: str
    order_id: str | None
    payment_intent_id: str
    amount: int
    currency: str
    state: TxnState
    captures: list[dict[str, Any]] = field(default_factory=list)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    voids: list[dict[str, Any]] = field(default_factory=list)
    event_id: str = ""
    delivery: Literal["not_requested", "pending", "delivered", "abandoned"] = "not_requested"
    delivery_attempts: int = 0
