"""The gateway simulator served for real by uvicorn, driven by the real GatewayClient."""

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from pydantic import ValidationError

from services.gatewaysim.app import create_app
from services.gatewaysim.settings import GatewaySimSettings
from services.runtime.gateway_client import GatewayClient, GatewayProtocolError
from services.runtime.signature import verify

SECRET = "whsec_integration"


class _InProcessServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # leave Ctrl-C to pytest


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _serve(app: FastAPI) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # Accepted connections inherit this; without it Nagle + delayed ACK add ~40 ms per
    # keep-alive request on a socket handed to uvicorn.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # A short graceful timeout cancels handlers still holding back a "lost" response.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    server = _InProcessServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def healthy() -> bool:
        assert not task.done(), "server stopped during startup"
        try:
            return (await probe.get(f"{base_url}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        async with httpx.AsyncClient() as probe:
            await _eventually(healthy)
        yield base_url
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def bridge() -> AsyncIterator[tuple[str, list[tuple[str, dict[str, str], bytes, int]]]]:
    """A fake bridge that answers 503 to the first webhook and 200 afterwards."""
    received: list[tuple[str, dict[str, str], bytes, int]] = []
    app = FastAPI()

    @app.post("/webhooks/{gateway}")
    async def webhook(gateway: str, request: Request) -> Response:
        status = 503 if not received else 200
        received.append((gateway, dict(request.headers), await request.body(), status))
        return Response(status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async with _serve(app) as url:
        yield url, received


def _settings(**overrides: Any) -> GatewaySimSettings:
    values: dict[str, Any] = {
        "gateway_secrets": {"simgw": [SECRET, "whsec_next"]},
        "lost_response_delay_s": 1.0,  # > the client's 0.5 s timeout
        "slow_delay_s": 0.2,
        "delivery_backoff_base_s": 0.05,
    }
    return GatewaySimSettings(**(values | overrides))


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    async with _serve(create_app(_settings())) as url:
        yield url


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
async def client(sim: str) -> AsyncIterator[GatewayClient]:
    async with GatewayClient(sim, timeout_s=0.5, max_attempts=4, sleep=_no_sleep) as gateway:
        yield gateway


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def _payment(
    http: httpx.AsyncClient, sim: str, marker: str = "", mode: str = "authorize", **extra: Any
) -> dict[str, Any]:
    request = {
        "order_id": f"ord_{uuid.uuid4().hex[:12]}",
        "payment_intent_id": f"pi_{uuid.uuid4().hex[:12]}{marker}",
        "amount": 1250,
        "currency": "EUR",
        "mode": mode,
        "deliver": False,
        **extra,
    }
    response = await http.post(f"{sim}/sim/payments", json=request)
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_flaky_capture_is_captured_exactly_once(
    http: httpx.AsyncClient, sim: str, client: GatewayClient
) -> None:
    txn = (await _payment(http, sim, "_capture_flaky"))["transaction_id"]
    outcome = await client.capture(txn, 1250, "EUR", f"capture:{txn}")
    assert (outcome.kind, outcome.attempts, outcome.body["status"]) == ("succeeded", 3, "captured")
    payment = await client.get_payment(txn)
    assert payment["state"] == "captured"
    assert [c["capture_id"] for c in payment["captures"]] == [outcome.body["capture_id"]]


async def test_idempotency_key_replays_the_first_result(
    http: httpx.AsyncClient, sim: str, client: GatewayClient
) -> None:
    txn = (await _payment(http, sim))["transaction_id"]
    first = await client.capture(txn, 1250, "EUR", f"capture:{txn}")
    again = await client.capture(txn, 1250, "EUR", f"capture:{txn}")
    assert again.kind == "succeeded"
    assert again.body == first.body
    with pytest.raises(GatewayProtocolError) as conflict:  # a new key is a conflict
        await client.capture(txn, 1250, "EUR", f"other:{txn}")
    assert conflict.value.status_code == 409
    with pytest.raises(GatewayProtocolError) as reused:  # same key, another request
        await client.refund(txn, 1250, "EUR", "test", f"capture:{txn}")
    assert reused.value.status_code == 400
    assert len((await client.get_payment(txn))["captures"]) == 1


async def test_lost_capture_is_unknown_then_visible_once(
    http: httpx.AsyncClient, sim: str, client: GatewayClient
) -> None:
    txn = (await _payment(http, sim, "_capture_lost"))["transaction_id"]
    outcome = await client.capture(txn, 1250, "EUR", f"capture:{txn}")
    assert (outcome.kind, outcome.reason) == ("unknown", "timeout")
    payment = await client.get_payment(txn)
    assert payment["state"] == "captured"
    assert len(payment["captures"]) == 1
    replay = await client.capture(txn, 1250, "EUR", f"capture:{txn}")  # answers at once
    assert replay.body["capture_id"] == payment["captures"][0]["capture_id"]


async def test_lost_refund_is_unknown_then_refunded_once(
    http: httpx.AsyncClient, sim: str, client: GatewayClient
) -> None:
    txn = (await _payment(http, sim, "_refund_lost", mode="sale"))["transaction_id"]
    outcome = await client.refund(txn, 1250, "EUR", "out_of_stock", f"refund:{txn}")
    assert outcome.kind == "unknown"
    payment = await client.get_payment(txn)
    assert (payment["state"], len(payment["refunds"])) == ("refunded", 1)


async def test_refund_declined_and_flaky(
    http: httpx.AsyncClient, sim: str, client: GatewayClient
) -> None:
    declined = (await _payment(http, sim, "_refund_declined", mode="sale"))["transaction_id"]
    outcome = await client.refund(declined, 1250, "EUR", "out_of_stock", f"refund:{declined}")
    assert (outcome.kind, outcome.code) == ("declined", "refund_declined")
    assert (await client.get_payment(declined))["refunds"] == []
    flaky = (await _payment(http, sim, "_refund_flaky", mode="sale"))["transaction_id"]
    outcome = await client.refund(flaky, 1250, "EUR", "out_of_stock", f"refund:{flaky}")
    assert (outcome.kind, outcome.attempts, outcome.body["status"]) == ("succeeded", 3, "succeeded")
    assert len((await client.get_payment(flaky))["refunds"]) == 1


async def test_state_rules(http: httpx.AsyncClient, sim: str, client: GatewayClient) -> None:
    txn = (await _payment(http, sim))["transaction_id"]
    outcome = await client.refund(txn, 1250, "EUR", "test", f"refund:{txn}")
    assert (outcome.kind, outcome.code) == ("declined", "not_captured")
    assert (await client.void(txn, f"void:{txn}")).body == {"status": "voided"}
    assert (await client.get_payment(txn))["state"] == "voided"
    assert (await client.capture("txn_unknown", 1, "EUR", "capture:unknown")).kind == "not_found"
    declined = (await _payment(http, sim, "_capture_declined"))["transaction_id"]
    outcome = await client.capture(declined, 1250, "EUR", f"capture:{declined}")
    assert (outcome.kind, outcome.code) == ("declined", "capture_declined")
    assert (await client.void(declined, f"void:{declined}")).kind == "succeeded"


async def test_slow_marker_delays_every_call(
    http: httpx.AsyncClient, sim: str, client: GatewayClient
) -> None:
    txn = (await _payment(http, sim, "_slow"))["transaction_id"]
    started = time.monotonic()
    assert (await client.capture(txn, 1250, "EUR", f"capture:{txn}")).kind == "succeeded"
    assert time.monotonic() - started >= 0.2


async def test_undelivered_webhook_body_is_signed_as_returned(
    http: httpx.AsyncClient, sim: str
) -> None:
    created = await _payment(
        http, sim, mode="decline", extra_data={"card_number": "4242424242424242"}
    )
    body = created["body"].encode()
    t = verify(["whsec_other", SECRET], created["signature"], body, int(time.time()), 300)
    event = json.loads(body)
    assert event["created"] == t
    assert event["id"].startswith("evt_")
    assert event["type"] == "payment.failed"
    assert event["data"]["transaction_id"] == created["transaction_id"]
    assert event["data"]["failure_code"] == "card_declined"
    assert event["data"]["card_number"] == "4242424242424242"
    assert event["data"]["payment_method"] == {"type": "card", "brand": "visa", "last4": "4242"}


async def test_delivered_webhook_is_the_exact_signed_bytes(
    http: httpx.AsyncClient, bridge: tuple[str, list[tuple[str, dict[str, str], bytes, int]]]
) -> None:
    bridge_url, received = bridge
    async with _serve(create_app(_settings(bridge_url=bridge_url))) as sim:
        created = await _payment(http, sim, mode="sale", deliver=True)

        async def delivered() -> bool:
            ledger = (await http.get(f"{sim}/sim/ledger")).json()["transactions"]
            txn = next(t for t in ledger if t["transaction_id"] == created["transaction_id"])
            return bool(txn["delivery"] == "delivered")

        await _eventually(delivered)
    assert [status for *_, status in received] == [503, 200]
    for gateway, headers, raw, _ in received:
        assert (gateway, raw) == ("simgw", created["body"].encode())
        assert headers["content-type"] == "application/json"
        verify([SECRET], headers["paysaga-signature"], raw, int(time.time()), 300)
    assert received[0][1]["paysaga-signature"] == created["signature"]


async def test_concurrent_calls_with_one_key_execute_once(
    http: httpx.AsyncClient, sim: str, client: GatewayClient
) -> None:
    txn = (await _payment(http, sim, "_slow"))["transaction_id"]
    first, second = await asyncio.gather(
        client.capture(txn, 1250, "EUR", f"capture:{txn}"),
        client.capture(txn, 1250, "EUR", f"capture:{txn}"),
    )
    assert first.body == second.body
    assert len((await client.get_payment(txn))["captures"]) == 1


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSAGA_GATEWAY_SECRETS", '{"simgw": ["whsec_a", "whsec_b"]}')
    monkeypatch.setenv("PAYSAGA_GATEWAYSIM_PORT", "18090")
    settings = GatewaySimSettings()
    assert settings.gateway_secrets == {"simgw": ["whsec_a", "whsec_b"]}
    assert settings.gatewaysim_port == 18090
    monkeypatch.setenv("PAYSAGA_GATEWAY_SECRETS", '{"othergw": ["whsec_a"]}')
    with pytest.raises(ValidationError, match="no secret for 'simgw'"):
        GatewaySimSettings()
