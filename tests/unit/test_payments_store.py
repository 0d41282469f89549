"""payments' statements built once set the columns their field lists name: a value
``order_values`` or ``confirmation_values`` gives that the list does not name would be
bound to nothing, and its column never written."""

from datetime import UTC, datetime

from services.payments.domain import Confirmation, Item, Order
from services.payments.store import (
    CONFIRMATION_FIELDS,
    ORDER_FIELDS,
    confirmation_values,
    order_values,
)


def test_an_orders_values_are_the_columns_its_statements_set() -> None:
    order = Order(
        order_id="ord_1",
        customer_id="cus_1",
        currency="EUR",
        total_amount=1500,
        payment_intent_id="pi_1",
        payment_method="card",
        attempt=1,
        status="pending",
        items=(Item("sku-a", 1),),
        correlation_id="corr_1",
        content_hash="h",
        earlier_intents=("pi_0",),
    )
    assert tuple(order_values(order)) == ORDER_FIELDS


def test_a_confirmations_values_are_the_columns_its_statements_set() -> None:
    c = Confirmation(
        gateway="simgw",
        gateway_event_id="evt_1",
        type="payment.succeeded",
        transaction_id="txn_1",
        payment_intent_id="pi_1",
        order_id="ord_1",
        amount=1500,
        currency="EUR",
        payment_method_type="card",
        brand="visa",
        last4="4242",
        failure_code=None,
        failure_message=None,
        record_time=datetime.now(UTC),
    )
    assert tuple(confirmation_values(c)) == CONFIRMATION_FIELDS
