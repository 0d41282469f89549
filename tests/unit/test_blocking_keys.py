"""The runtime's dead-letter blocking key (services/runtime/blocking.py): the records a
dead letter parks are those of its key space only."""

from __future__ import annotations

from services.runtime.blocking import order_key as _order_key
from services.runtime.messages import Record


def record(topic: str, key: bytes | None, offset: int = 7) -> Record:
    return Record(
        topic=topic, partition=2, offset=offset, key=key, value=b"{}", headers=(), timestamp_ms=0
    )


def test_a_sku_and_an_order_id_spelled_alike_are_different_keys() -> None:
    stock = _order_key(record("catalog.stock.v1", b"X"))
    assert stock != _order_key(record("payments.events.v1", b"X"))
    assert stock != _order_key(record("capture.events.v1", b"X"))
    assert stock == _order_key(record("catalog.stock.v1", b"X", offset=8))  # one SKU, one key


def test_order_keyed_topics_share_one_key_per_order() -> None:
    keys = {
        _order_key(record(topic, b"ord_1"))
        for topic in (
            "checkout.orders.v1",
            "gateway.confirmations.v1",
            "payments.events.v1",
            "inventory.events.v1",
            "capture.events.v1",
            "refunds.events.v1",
        )
    }
    assert keys == {"ord_1"}


def test_topics_not_in_topics_yaml_keep_their_key() -> None:
    assert _order_key(record("test.in.abc", b"acct-1")) == "acct-1"


def test_a_record_without_a_key_blocks_only_itself() -> None:
    assert _order_key(record("payments.events.v1", None)) == "payments.events.v1/2/7"
