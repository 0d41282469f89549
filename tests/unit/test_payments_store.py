"""payments' statements built once set the columns their field lists name: a value
``order_values`` or ``confirmation_values`` gives that the list does not name would be
bound to nothing, and its column never written."""

from services.payments.store import (
    CONFIRMATION_FIELDS,
    ORDER_FIELDS,
    confirmation_values,
    order_values,
)
from tests.support.payments import make_confirmation, make_order


def test_an_orders_values_are_the_columns_its_statements_set() -> None:
    assert tuple(order_values(make_order(earlier_intents=("pi_0",)))) == ORDER_FIELDS


def test_a_confirmations_values_are_the_columns_its_statements_set() -> None:
    assert tuple(confirmation_values(make_confirmation())) == CONFIRMATION_FIELDS
