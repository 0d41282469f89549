import json
import random

import httpx
import pytest

from services.runtime.gateway_client import (
    GatewayClient,
    GatewayNotFoundError,
    GatewayProtocolError,
    GatewayUnavailableError,
)


class Recorder:
    """Scripted gateway: answers the queued responses in order and records requests."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)

    def client(self, max_attempts: int = 4) -> GatewayClient:
        return GatewayClient(
            "http://gateway.test",
            max_attempts=max_attempts,
            backoff_base_s=0.1,
            rng=random.Random(7),
            sleep=self.sleep,
            transport=httpx.MockTransport(self.handle),
        )


def _error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": f"{code}!"}})


async def test_503_twice_then_200_succeeds_once_with_the_same_key() -> None:
    gw = Recorder(
        _error(503, "down"), _error(503, "down"), httpx.Response(200, json={"capture_id": "cap_1"})
    )
    async with gw.client() as client:
        outcome = await client.capture("txn_1", 1250, "EUR", "capture:txn_1")
    assert outcome.kind == "succeeded"
    assert outcome.body == {"capture_id": "cap_1"}
    assert outcome.attempts == 3
    assert [r.headers["Idempotency-Key"] for r in gw.requests] == ["capture:txn_1"] * 3
    assert {r.url.path for r in gw.requests} == {"/v1/payments/txn_1/capture"}
    assert json.loads(gw.requests[0].content) == {"amount": 1250, "currency": "EUR"}
    assert len(gw.sleeps) == 2
    assert 0.05 <= gw.sleeps[0] <= 0.1
    assert 0.1 <= gw.sleeps[1] <= 0.2


async def test_read_timeout_is_unknown_without_retry() -> None:
    gw = Recorder(httpx.ReadTimeout("slow"))
    async with gw.client() as client:
        outcome = await client.capture("txn_1", 1250, "EUR", "capture:txn_1")
    assert (outcome.kind, outcome.reason, len(gw.requests)) == ("unknown", "timeout", 1)


async def test_connect_errors_are_retried_then_succeed() -> None:
    gw = Recorder(
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("no route"),
        httpx.Response(200, json={"status": "voided"}),
    )
    async with gw.client() as client:
        outcome = await client.void("txn_1", "void:txn_1")
    assert outcome.kind == "succeeded"
    assert gw.requests[0].content == b""
    assert all(r.headers["Idempotency-Key"] == "void:txn_1" for r in gw.requests)


async def test_exhausted_5xx_budget_is_unknown() -> None:
    gw = Recorder(*[_error(502, "bad_gateway")] * 3)
    async with gw.client(max_attempts=3) as client:
        outcome = await client.refund("txn_1", 500, "EUR", "out_of_stock", "refund:txn_1")
    assert (outcome.kind, outcome.reason, outcome.attempts) == ("unknown", "http_502", 3)
    assert len(gw.requests) == 3


async def test_402_is_declined_without_retry() -> None:
    gw = Recorder(_error(402, "refund_declined"))
    async with gw.client() as client:
        outcome = await client.refund("txn_1", 500, "EUR", "out_of_stock", "refund:txn_1")
    assert (outcome.kind, outcome.code, outcome.message) == (
        "declined",
        "refund_declined",
        "refund_declined!",
    )
    assert json.loads(gw.requests[0].content)["reason"] == "out_of_stock"
    assert gw.sleeps == []


async def test_404_is_not_found() -> None:
    gw = Recorder(_error(404, "not_found"))
    async with gw.client() as client:
        outcome = await client.capture("txn_x", 1, "EUR", "capture:txn_x")
    assert outcome.kind == "not_found"


@pytest.mark.parametrize("status", [400, 409, 422])
async def test_other_4xx_is_a_protocol_error(status: int) -> None:
    gw = Recorder(_error(status, "conflict"))
    async with gw.client() as client:
        with pytest.raises(GatewayProtocolError) as excinfo:
            await client.capture("txn_1", 1, "EUR", "capture:txn_1")
    assert excinfo.value.status_code == status


async def test_transaction_id_is_escaped_in_the_path() -> None:
    gw = Recorder(httpx.Response(200, json={"status": "voided"}))
    async with gw.client() as client:
        await client.void("txn/../x", "void:1")
    assert gw.requests[0].url.raw_path == b"/v1/payments/txn%2F..%2Fx/void"


async def test_empty_idempotency_key_is_refused() -> None:
    async with Recorder().client() as client:
        with pytest.raises(ValueError, match="idempotency"):
            await client.void("txn_1", "")


async def test_get_payment_retries_timeouts_and_returns_json() -> None:
    gw = Recorder(httpx.ReadTimeout("slow"), httpx.Response(200, json={"state": "captured"}))
    async with gw.client() as client:
        assert await client.get_payment("txn_1") == {"state": "captured"}
    assert "Idempotency-Key" not in gw.requests[0].headers


async def test_get_payment_errors() -> None:
    gw = Recorder(
        _error(404, "not_found"), httpx.Response(200, text="oops"), *[_error(503, "x")] * 2
    )
    async with gw.client(max_attempts=2) as client:
        with pytest.raises(GatewayNotFoundError):
            await client.get_payment("txn_1")
        with pytest.raises(GatewayProtocolError):
            await client.get_payment("txn_1")
        with pytest.raises(GatewayUnavailableError):
            await client.get_payment("txn_1")


def test_backoff_is_capped_with_equal_jitter() -> None:
    client = GatewayClient(
        "http://gateway.test", backoff_base_s=1.0, backoff_max_s=4.0, rng=random.Random(1)
    )
    for retry, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        assert ceiling / 2 <= client.backoff(retry) <= ceiling


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (409, "idempotency_key_in_use"),
        (429, "rate_limited"),
        (408, "request_timeout"),
        (404, "not_found"),  # misrouted: the contract gives this call no 404
    ],
)
async def test_a_payment_request_answered_with_a_transient_4xx_is_not_a_refusal(
    status: int, code: str
) -> None:
    """A conflict (the same key still being processed — another worker's call after a
    lease ran out), a rate limit or a request timeout says nothing about the payment:
    the request is sent again under the same key, it never fails the attempt."""
    gw = Recorder(_error(status, code))
    async with gw.client() as client:
        outcome = await client.create_payment_intent("ord_1", 2500, "EUR", "card", "intent:ord_1:1")
    assert (outcome.kind, outcome.reason) == ("unknown", f"http_{status}")


@pytest.mark.parametrize("status", [400, 402, 422])
async def test_a_payment_request_refused_with_4xx_is_declined(status: int) -> None:
    gw = Recorder(_error(status, "request_declined"))
    async with gw.client() as client:
        outcome = await client.create_payment_intent("ord_1", 2500, "EUR", "card", "intent:ord_1:1")
    assert (outcome.kind, outcome.code) == ("declined", "request_declined")
