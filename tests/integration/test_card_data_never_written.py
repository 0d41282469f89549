"""Card data is never written anywhere (docs/contract.md §2.2), on the real broker and database:
an OrderPlaced carrying a card number and a security code as extra fields is
dead-lettered by payments, a later record of its key carrying a cvv is parked, and
neither value appears in the dead letter (value or headers), the dead_letters and
parked rows, or the service's log."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from services.runtime import dlq, migrate
from tests.conftest import Infra
from tests.support.harness import Proc, envelope, free_port, produce, query, read_all, uid, wait_for

pytestmark = pytest.mark.integration

PAN, CVV = "4111111111111111", "987"
GROUP = "paysaga.payments"


@pytest.fixture
def payments(infra: Infra) -> Iterator[Proc]:
    migrate.upgrade("payments", infra.db_url("paysaga_payments"))  # idempotent
    proc = Proc(
        f"payments-carddata-{uid()}",
        ["-m", "services.payments.app"],
        env={
            "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": infra.bootstrap,
            "PAYSAGA_DATABASE_URL": infra.database_url,
            "PAYSAGA_PAYMENTS_PORT": str(free_port()),
            "PAYSAGA_POLL_TIMEOUT_MS": "200",
            "PAYSAGA_GATEWAY_SECRETS": json.dumps({"simgw": ["whsec_test"]}),
        },
    ).start()
    yield proc
    proc.stop()


def order_placed(order_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": "cus_1",
        "currency": "EUR",
        "items": [{"sku": "TICKET-STANDARD", "quantity": 1, "unit_amount": 4500}],
        "total_amount": 4500,
        "payment_intent_id": uid("pi_"),
        "payment_method": "card",
        **extra,
    }


def leaks(text: str) -> bool:
    """The card number, or the security code as a value of its own (not the same digits
    inside a random hex id such as an event id)."""
    return PAN in text or re.search(rf"(?<![0-9A-Za-z]){CVV}(?![0-9A-Za-z])", text) is not None


def test_order_placed_with_card_data_is_dead_lettered_without_it(
    infra: Infra, payments: Proc
) -> None:
    order_id = uid("ord_")
    poison = envelope("OrderPlaced", order_placed(order_id, cvv=CVV, card_number=PAN))
    # a valid order, but its envelope carries a cvv (unknown envelope fields are
    # ignored): parked behind the dead letter, so stored — without it
    later = envelope("OrderPlaced", order_placed(order_id), cvv=CVV)
    asyncio.run(
        produce(infra.bootstrap, "checkout.orders.v1", [(order_id, poison), (order_id, later)])
    )

    def dead_letters() -> list[Any]:
        records = asyncio.run(read_all(infra.bootstrap, dlq.dlq_topic(GROUP)))
        return [r for r in records if r.key == order_id.encode()]

    [dead] = wait_for(dead_letters, 60, "the dead letter")
    headers = dlq.header_dict(dead.headers)
    assert headers[dlq.H_ERROR_CLASS] == "PermanentError"
    assert headers[dlq.H_ERROR_MESSAGE].startswith("schema_violation: OrderPlaced: ")
    assert "cvv (Extra inputs are not permitted)" in headers[dlq.H_ERROR_MESSAGE]
    assert headers[dlq.H_REDACTED] == "card_key"
    assert not any(leaks(v) for v in headers.values())
    value = json.loads(dead.value)
    assert value["payload"]["order_id"] == order_id
    assert value["payload"]["cvv"] == value["payload"]["card_number"] == "[redacted]"
    assert not leaks(dead.value.decode())

    conninfo = infra.conninfo("paysaga_payments")
    rows = wait_for(
        lambda: query(
            conninfo,
            "SELECT error_message FROM dead_letters WHERE consumer_group = %s AND order_key = %s",
            GROUP,
            order_id,
        ),
        30,
        "the dead_letters row",
    )
    assert [r[0] for r in rows] == [headers[dlq.H_ERROR_MESSAGE]]
    parked = wait_for(
        lambda: query(
            conninfo,
            "SELECT value, headers::text FROM parked WHERE consumer_group = %s AND order_key = %s",
            GROUP,
            order_id,
        ),
        30,
        "the parked record",
    )
    assert len(parked) == 1
    assert json.loads(bytes(parked[0][0]))["cvv"] == "[redacted]"
    assert not leaks(bytes(parked[0][0]).decode() + parked[0][1])

    log = payments.log_text()
    where = f"checkout.orders.v1/{headers[dlq.H_PARTITION]}@{headers[dlq.H_OFFSET]}"
    assert f"dead-lettering {where}: PermanentError: schema_violation" in log
    assert not leaks(log)
