"""The gateway bridge as a real process against the real broker (docs/contract.md §2.2)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from services.runtime import tracing
from tests.conftest import Infra
from tests.support.harness import Proc, free_port, uid, wait_for

pytestmark = pytest.mark.integration

TOPIC = "gateway.confirmations.v1"
SECRETS = json.dumps({"simgw": ["whsec_test"], "othergw": ["whsec_other"]})
SIGNATURE = "t=1763805600,v1=" + "ab" * 32 + ",v1=" + "cd" * 32


def start_bridge(bootstrap: str, **env: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        f"bridge-{uid()}",
        ["-m", "services.bridge.app"],
        env={
            "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "PAYSAGA_GATEWAY_SECRETS": SECRETS,
            "PAYSAGA_BRIDGE_PORT": str(port),
            **env,
        },
    ).start()
    return proc, f"http://127.0.0.1:{port}"


def answers(proc: Proc, url: str, expected: int = 200) -> bool:
    assert proc.alive, proc.log_text()[-3000:]
    try:
        return httpx.get(url, timeout=5).status_code == expected
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def bridge(infra: Infra) -> Iterator[str]:
    proc, base_url = start_bridge(infra.bootstrap)
    wait_for(lambda: answers(proc, f"{base_url}/readyz"), timeout=60, what="bridge ready")
    yield base_url
    proc.stop()


def post(base_url: str, body: bytes | Iterator[bytes], gateway: str = "simgw",
         signature: str | None = SIGNATURE, traceparent: str | None = None,
         ) -> httpx.Response:  # fmt: skip
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["paysaga-signature"] = signature
    if traceparent is not None:
        headers["traceparent"] = traceparent
    return httpx.post(f"{base_url}/webhooks/{gateway}", content=body, headers=headers, timeout=30)


async def fetch(bootstrap: str, partition: int, offset: int) -> Any:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(TOPIC, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        return await consumer.getone()
    finally:
        await consumer.stop()


def test_body_is_stored_byte_for_byte_with_key_and_headers(infra: Infra, bridge: str) -> None:
    order_id = uid("ord_")
    # odd spacing, escapes and raw UTF-8: any re-serialization would show
    body = (
        b'{ "id":"evt_1",  "type":"payment.authorized","created":1763805600,\n'
        b' "data":{"order_id":"' + order_id.encode() + b'","payment_intent_id":"pi_1",'
        b'"amount":5000,"currency":"EUR","note":"caf\\u00e9 \xc3\xbc"}}\r\n'
    )
    response = post(bridge, body)
    assert response.status_code == 202, response.text
    ack = response.json()
    assert ack["status"] == "accepted"
    assert ack["topic"] == TOPIC

    record = asyncio.run(fetch(infra.bootstrap, ack["partition"], ack["offset"]))
    assert record.value == body
    assert record.key == order_id.encode()
    headers = dict(record.headers)
    assert tracing.parse(headers.pop("traceparent")) is not None  # a new trace: none came in
    assert headers == {
        "paysaga-gateway": b"simgw",
        "paysaga-signature": SIGNATURE.encode(),
    }


def test_the_record_continues_the_requests_trace(infra: Infra, bridge: str) -> None:
    order_id = uid("ord_")
    body = json.dumps({"id": "evt_t", "data": {"order_id": order_id}}).encode()
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = post(bridge, body, traceparent=incoming)
    assert response.status_code == 202, response.text
    ack = response.json()
    record = asyncio.run(fetch(infra.bootstrap, ack["partition"], ack["offset"]))
    parsed = tracing.parse(dict(record.headers)["traceparent"])
    assert parsed is not None
    assert parsed[0] == "4bf92f3577b34da6a3ce929d0e0e4736"  # the request's trace
    assert parsed[1] != "00f067aa0ba902b7"  # the bridge's own span in it


def test_key_falls_back_to_payment_intent_id(infra: Infra, bridge: str) -> None:
    intent = uid("pi_")
    body = json.dumps({"id": "evt_2", "data": {"payment_intent_id": intent}}).encode()
    response = post(bridge, body, gateway="othergw")
    assert response.status_code == 202, response.text
    record = asyncio.run(fetch(infra.bootstrap, response.json()["partition"],
                               response.json()["offset"]))  # fmt: skip
    assert record.key == intent.encode()
    assert dict(record.headers)["paysaga-gateway"] == b"othergw"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "no_key"),
        (b'{"id": "evt_3", "data": {"amount": 1}}', "no_key"),
        (b'["data"]', "no_key"),
    ],
)
def test_body_without_a_key_is_rejected(bridge: str, body: bytes, error: str) -> None:
    response = post(bridge, body)
    assert response.status_code == 400
    assert response.json()["error"] == error


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"note": "card 4242 4242 4242 4242"}, "card_number_present"),
        ({"payment_method": {"type": "card", "cvc": "123"}}, "security_code_present"),
    ],
)
def test_card_data_is_refused_and_never_stored(
    infra: Infra, bridge: str, data: dict[str, Any], error: str
) -> None:
    order_id = uid("ord_")
    body = json.dumps({"id": "evt_c", "data": {"order_id": order_id, **data}}).encode()
    response = post(bridge, body)
    assert response.status_code == 422
    assert response.json()["error"] == error
    assert "4242" not in response.text
    # a later good webhook of the same order is the next record of the key: nothing between
    good = json.dumps({"id": "evt_g", "data": {"order_id": order_id}}).encode()
    ack = post(bridge, good).json()
    previous = asyncio.run(fetch(infra.bootstrap, ack["partition"], max(0, ack["offset"] - 1)))
    assert previous.key != order_id.encode() or previous.value == good


def test_card_data_behind_a_repeated_key_is_refused_and_never_stored(
    infra: Infra, bridge: str
) -> None:
    # json.loads keeps the last "data" only: the card data must be found in the first
    order_id = uid("ord_")
    body = (
        b'{"id":"evt_r","data":{"card_number":"4111111111111111","cvv":"987"},'
        b'"data":{"order_id":"' + order_id.encode() + b'","amount":1}}'
    )
    response = post(bridge, body)
    assert response.status_code == 422
    assert response.json()["error"] == "card_number_present"
    good = json.dumps({"id": "evt_g", "data": {"order_id": order_id}}).encode()
    ack = post(bridge, good).json()
    previous = asyncio.run(fetch(infra.bootstrap, ack["partition"], max(0, ack["offset"] - 1)))
    assert previous.key != order_id.encode() or previous.value == good


def test_missing_signature_is_rejected(bridge: str) -> None:
    response = post(bridge, b'{"data": {"order_id": "ord_1"}}', signature=None)
    assert response.status_code == 400
    assert response.json()["error"] == "missing_signature"


def test_unknown_gateway_is_404(bridge: str) -> None:
    response = post(bridge, b'{"data": {"order_id": "ord_1"}}', gateway="nosuchgw")
    assert response.status_code == 404


def test_oversized_body_is_413(bridge: str) -> None:
    big = b'{"data": {"order_id": "ord_1"}, "pad": "' + b"x" * 64 * 1024 + b'"}'
    assert post(bridge, big).status_code == 413  # Content-Length says so

    def chunked() -> Iterator[bytes]:  # no Content-Length: caught while reading
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    assert post(bridge, chunked()).status_code == 413


def test_metrics_count_outcomes(bridge: str) -> None:
    post(bridge, b'{"data": {"order_id": "ord_1"}}', signature=None)
    text = httpx.get(f"{bridge}/metrics", timeout=5).text
    assert 'paysaga_bridge_webhooks_total{gateway="simgw",outcome="missing_signature"}' in text


def test_kafka_unreachable_is_503(infra: Infra) -> None:
    proc, base_url = start_bridge(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        wait_for(lambda: answers(proc, f"{base_url}/healthz"), timeout=60, what="bridge alive")
        assert answers(proc, f"{base_url}/readyz", expected=503)
        response = post(base_url, b'{"data": {"order_id": "ord_1"}}')
        assert response.status_code == 503
        assert response.json()["error"] == "kafka_unavailable"
    finally:
        proc.kill()


def test_refuses_to_start_without_gateway_secrets(infra: Infra) -> None:
    proc, _ = start_bridge(infra.bootstrap, PAYSAGA_GATEWAY_SECRETS="{}")
    assert proc.wait_exit(60) != 0
    assert "PAYSAGA_GATEWAY_SECRETS" in proc.log_text()
