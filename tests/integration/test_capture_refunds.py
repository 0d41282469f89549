"""Capture and refunds as real processes against the gateway simulator (served in this
test's event loop), driven by the saga events they consume on real Kafka topics.

What is checked is what matters for money: the gateway's ledger (exactly one capture,
refund or void) and the events on capture.events.v1 / refunds.events.v1. "No second
call" is observed by counting the simulator's HTTP requests, after a later event on
the same order key (hence the same partition) has been handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from aiokafka import AIOKafkaConsumer
from fastapi import FastAPI, Request, Response

from services.gatewaysim.app import create_app
from services.gatewaysim.ledger import Simulator
from services.gatewaysim.models import CaptureRequest, Transaction
from services.gatewaysim.settings import GatewaySimSettings
from services.runtime import migrate
from services.runtime.topics import partitions_of
from tests.conftest import Infra
from tests.support.harness import Proc, envelope, free_port, produce, query, uid

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 2.0
SIM = GatewaySimSettings(
    lost_response_delay_s=5 * CLIENT_TIMEOUT_S,  # the client gives up long before
    slow_delay_s=1.0,
)
LEASE_S = 8.0  # > a round with a look-up and a capture of a `_slow` payment
CAPTURE_MAX_ATTEMPTS = 10  # the default; outlasts the hold's margin in the expiry test
INVENTORY = "inventory.events.v1"
OUT_TOPICS = ("capture.events.v1", "refunds.events.v1")
Json = dict[str, Any]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@dataclasses.dataclass
class Stack:
    infra: Infra
    url: str
    sim: Simulator
    requests: Counter[tuple[str, str]]  # (transaction id, operation) -> HTTP requests
    events: list[Json]
    procs: dict[str, Proc]
    #: (transaction id, operation) the gateway answers 503 to, executing nothing
    outage: set[tuple[str, str]]

    async def payment(self, marker: str = "", mode: str = "authorize") -> Json:
        """A transaction in the simulator (no webhook) and the saga context it gets."""
        order_id, pi = uid("ord"), f"{uid('pi')}{marker}"
        async with httpx.AsyncClient() as http:
            response = await http.post(
                f"{self.url}/sim/payments",
                json={"order_id": order_id, "payment_intent_id": pi, "amount": 1250,
                      "currency": "EUR", "mode": mode, "deliver": False},
            )  # fmt: skip
        response.raise_for_status()
        return {
            "order_id": order_id, "attempt": 1, "payment_intent_id": pi,
            "transaction_id": response.json()["transaction_id"],
            "flow": "sale" if mode == "sale" else "authorization", "amount": 1250,
            "currency": "EUR", "gateway": "simgw",
        }  # fmt: skip

    async def send(self, topic: str, event_type: str, payload: Json, **extra: Any) -> bytes:
        extra.setdefault("occurred_at", datetime.now(UTC).isoformat().replace("+00:00", "Z"))
        extra.setdefault("saga_seq", 2)
        value = envelope(event_type, payload, **extra)
        await produce(self.infra.bootstrap, topic, [(payload["order_id"], value)])
        return value

    async def reserved(self, ctx: Json, **extra: Any) -> bytes:
        items = [{"sku": "A", "quantity": 1}]
        return await self.send(INVENTORY, "StockReserved", {**ctx, "items": items}, **extra)

    async def short(self, ctx: Json, **extra: Any) -> bytes:
        payload = {**ctx, "short_skus": ["A"]}
        return await self.send(INVENTORY, "StockReservationFailed", payload, **extra)

    def of(self, order_id: str, event_type: str | None = None) -> list[Json]:
        return [
            e for e in self.events
            if e["payload"].get("order_id") == order_id
            and (event_type is None or e["event_type"] == event_type)
        ]  # fmt: skip

    async def event(self, order_id: str, event_type: str, timeout: float = 60) -> Json:
        found: list[Json] = await eventually(
            lambda: self.of(order_id, event_type), timeout, event_type
        )
        return found[0]

    def ledger(self, transaction_id: str) -> Transaction:
        return self.sim.ledger[transaction_id]


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``check`` (sync or async) until truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.05)


def _service(name: str, infra: Infra, gateway_url: str) -> Proc:
    prefix = f"PAYSAGA_{name.upper()}"
    return Proc(
        f"{name}-{uid()}",
        ["-m", f"services.{name}.app"],
        env={
            "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": infra.bootstrap,
            "PAYSAGA_DATABASE_URL": infra.database_url,
            "PAYSAGA_GATEWAY_URL": gateway_url,
            "PAYSAGA_GATEWAY_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
            "PAYSAGA_POLL_TIMEOUT_MS": "200",
            f"{prefix}_PORT": str(free_port()),
            f"{prefix}_RETRY_BASE_S": "0.2",
            f"{prefix}_RETRY_MAX_S": "1",
            f"{prefix}_LEASE_S": str(LEASE_S),
            # after the retry budget, look-ups at most a second apart
            "PAYSAGA_CAPTURE_MAX_ATTEMPTS": str(CAPTURE_MAX_ATTEMPTS),
            "PAYSAGA_CAPTURE_STALLED_RETRY_MAX_S": "1",
        },
    )


def _port(proc: Proc) -> str:
    service = proc.argv[1].split(".")[1]  # -m services.<service>.app
    return proc.env[f"PAYSAGA_{service.upper()}_PORT"]


async def _ready(proc: Proc) -> None:
    port = _port(proc)

    async def answers() -> bool:
        assert proc.alive, f"{proc.name} exited:\n{proc.log_text()[-3000:]}"
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(answers, 60, f"{proc.name} ready")


@pytest.fixture(scope="module")
async def stack(infra: Infra) -> AsyncIterator[Stack]:
    for service in ("capture", "refunds"):
        migrate.upgrade(service, infra.db_url(f"paysaga_{service}"))
    app: FastAPI = create_app(SIM)
    requests: Counter[tuple[str, str]] = Counter()
    outage: set[tuple[str, str]] = set()

    @app.middleware("http")
    async def count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        parts = request.url.path.strip("/").split("/")  # v1/payments/{txn}[/{op}]
        if parts[:2] == ["v1", "payments"] and len(parts) >= 3:
            call = (parts[2], parts[3] if len(parts) > 3 else "get")
            requests[call] += 1
            if call in outage:
                error = {"error": {"code": "unavailable", "message": "test outage"}}
                return Response(json.dumps(error), 503, media_type="application/json")
        return await call_next(request)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    serving = asyncio.create_task(server.serve(sockets=[sock]))

    # every saga event from now on, read by a plain consumer (no group)
    tail = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap, enable_auto_commit=False)
    await tail.start()
    partitions = await partitions_of(infra.bootstrap, names=list(OUT_TOPICS))
    tail.assign(partitions)
    await tail.seek_to_end(*partitions)
    for tp in partitions:
        await tail.position(tp)  # resolve the end now, before anything is produced
    events: list[Json] = []

    async def collect() -> None:
        async for record in tail:
            events.append(json.loads(record.value))

    collecting = asyncio.create_task(collect())
    procs = {name: _service(name, infra, url).start() for name in ("capture", "refunds")}
    try:
        for proc in procs.values():
            await _ready(proc)
        yield Stack(infra, url, app.state.simulator, requests, events, procs, outage)
    finally:
        for proc in procs.values():
            proc.stop()
        collecting.cancel()
        await tail.stop()
        server.should_exit = True
        await serving


async def test_an_authorization_is_captured_once(stack: Stack) -> None:
    ctx = await stack.payment()
    reserved = json.loads(await stack.reserved(ctx, saga_seq=2, correlation_id="corr-1"))
    captured = await stack.event(ctx["order_id"], "PaymentCaptured")
    txn = stack.ledger(ctx["transaction_id"])
    assert len(txn.captures) == 1
    assert captured["payload"]["capture_id"] == txn.captures[0]["capture_id"]
    assert captured["causation_id"] == reserved["event_id"]
    assert captured["saga_seq"] == 3
    assert captured["correlation_id"] == "corr-1"


async def test_a_flaky_capture_is_captured_once(stack: Stack) -> None:
    ctx = await stack.payment("_capture_flaky")
    await stack.reserved(ctx)
    await stack.event(ctx["order_id"], "PaymentCaptured")
    assert len(stack.ledger(ctx["transaction_id"]).captures) == 1


async def test_a_lost_capture_response_is_resolved_by_a_lookup(stack: Stack) -> None:
    ctx = await stack.payment("_capture_lost")
    await stack.reserved(ctx)
    captured = await stack.event(ctx["order_id"], "PaymentCaptured")
    txn = stack.ledger(ctx["transaction_id"])
    assert len(txn.captures) == 1
    assert captured["payload"]["capture_id"] == txn.captures[0]["capture_id"]
    assert stack.requests[(ctx["transaction_id"], "get")] >= 1  # resolved by a look-up


async def test_a_declined_capture_is_voided(stack: Stack) -> None:
    ctx = await stack.payment("_capture_declined")
    await stack.reserved(ctx)
    declined = await stack.event(ctx["order_id"], "CaptureDeclined")
    assert declined["payload"]["decline_code"] == "capture_declined"
    voided = await stack.event(ctx["order_id"], "AuthorizationVoided")
    assert voided["payload"]["reason"] == "capture_declined"
    assert voided["causation_id"] == declined["event_id"]
    txn = stack.ledger(ctx["transaction_id"])
    assert (len(txn.voids), len(txn.captures), txn.state) == (1, 0, "voided")


async def test_an_expired_authorization_is_voided_not_captured(stack: Stack) -> None:
    ctx = await stack.payment()
    week_ago = (datetime.now(UTC) - timedelta(days=7)).isoformat().replace("+00:00", "Z")
    await stack.reserved(ctx, occurred_at=week_ago)
    await stack.event(ctx["order_id"], "AuthorizationExpired")
    voided = await stack.event(ctx["order_id"], "AuthorizationVoided")
    assert voided["payload"]["reason"] == "authorization_expired"
    txn = stack.ledger(ctx["transaction_id"])
    assert (len(txn.voids), len(txn.captures)) == (1, 0)
    assert stack.requests[(ctx["transaction_id"], "capture")] == 0


async def test_a_sale_is_confirmed_without_a_gateway_call(stack: Stack) -> None:
    ctx = await stack.payment(mode="sale")
    await stack.reserved(ctx)
    await stack.event(ctx["order_id"], "SaleConfirmed")
    assert not [k for k in stack.requests if k[0] == ctx["transaction_id"]]


async def test_an_authorization_out_of_stock_is_voided(stack: Stack) -> None:
    ctx = await stack.payment()
    await stack.short(ctx)
    voided = await stack.event(ctx["order_id"], "AuthorizationVoided")
    assert voided["payload"]["reason"] == "out_of_stock"
    assert len(stack.ledger(ctx["transaction_id"]).voids) == 1


async def test_a_sale_out_of_stock_is_refunded_once_however_often_redelivered(stack: Stack) -> None:
    ctx = await stack.payment(mode="sale")
    failed = await stack.short(ctx)
    refunded = await stack.event(ctx["order_id"], "RefundSucceeded")
    txn = stack.ledger(ctx["transaction_id"])
    assert len(txn.refunds) == 1
    assert refunded["payload"]["refund_id"] == txn.refunds[0]["refund_id"]
    assert refunded["payload"]["reason"] == "out_of_stock"

    # the same record again, and the same trigger under a new event id; then a second
    # payment of the same order (same key, same partition, so handled after them)
    doc = json.loads(failed)
    await produce(stack.infra.bootstrap, INVENTORY, [(ctx["order_id"], failed)])
    await stack.send(INVENTORY, "StockReservationFailed", doc["payload"])
    second = {**(await stack.payment(mode="sale")), "order_id": ctx["order_id"], "attempt": 2}
    await stack.short(second)
    await eventually(lambda: len(stack.of(ctx["order_id"], "RefundSucceeded")) == 2, 60, "2nd")
    assert stack.requests[(ctx["transaction_id"], "refund")] == 1
    assert len(stack.ledger(ctx["transaction_id"]).refunds) == 1
    assert len(stack.of(ctx["order_id"], "RefundSucceeded")) == 2  # one per transaction


async def test_a_redelivered_stock_reservation_is_captured_once(stack: Stack) -> None:
    ctx = await stack.payment()
    reserved = await stack.reserved(ctx)
    await stack.event(ctx["order_id"], "PaymentCaptured")
    await produce(stack.infra.bootstrap, INVENTORY, [(ctx["order_id"], reserved)])
    await stack.send(INVENTORY, "StockReserved", json.loads(reserved)["payload"])
    second = {**(await stack.payment()), "order_id": ctx["order_id"], "attempt": 2}
    await stack.reserved(second)
    await eventually(
        lambda: len(stack.of(ctx["order_id"], "PaymentCaptured")) == 2, 60, "capture 2"
    )
    assert stack.requests[(ctx["transaction_id"], "capture")] == 1
    assert len(stack.ledger(ctx["transaction_id"]).captures) == 1


async def test_a_declined_refund_needs_reconciliation(stack: Stack) -> None:
    ctx = await stack.payment("_refund_declined", mode="sale")
    await stack.short(ctx)
    failed = await stack.event(ctx["order_id"], "CompensationFailed")
    assert (failed["payload"]["action"], failed["payload"]["reason"]) == ("refund", "declined")
    assert len(stack.ledger(ctx["transaction_id"]).refunds) == 0
    metrics = await _metrics(stack.procs["refunds"])
    assert 'paysaga_compensation_failures_total{action="refund",reason="declined"}' in metrics


async def test_a_capture_whose_worker_died_mid_call_is_looked_up_and_captured_once(
    stack: Stack,
) -> None:
    ctx = await stack.payment("_slow")
    capture_db = stack.infra.conninfo("paysaga_capture")
    await stack.reserved(ctx)

    def in_flight() -> bool:
        rows = query(capture_db, "SELECT state FROM captures WHERE transaction_id = %s",
                     ctx["transaction_id"])  # fmt: skip
        return bool(rows) and rows[0][0] == "in_flight"

    await eventually(in_flight, 60, "the capture call in flight")
    stack.procs["capture"].kill()  # mid-call: the row stays in_flight with its lease
    stack.procs["capture"].start()
    await _ready(stack.procs["capture"])
    await stack.event(ctx["order_id"], "PaymentCaptured", timeout=LEASE_S + 60)
    assert len(stack.ledger(ctx["transaction_id"]).captures) == 1
    assert stack.requests[(ctx["transaction_id"], "get")] >= 1
    rows = query(capture_db, "SELECT attempts FROM captures WHERE transaction_id = %s",
                 ctx["transaction_id"])  # fmt: skip
    assert rows[0][0] >= 2  # reclaimed after the lease


async def _metrics(proc: Proc) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{_port(proc)}/metrics")).text


# capture: budget, expiry, amounts


def _capture_row(stack: Stack, transaction_id: str) -> tuple[Any, ...]:
    rows = query(
        stack.infra.conninfo("paysaga_capture"),
        "SELECT state, attempts, alerted_at, outcome_reason FROM captures"
        " WHERE transaction_id = %s",
        transaction_id,
    )
    return rows[0] if rows else ()


async def _stalled(stack: Stack, ctx: Json) -> None:
    """The retry budget is spent: CaptureFailed was emitted, the row is still looked up."""
    failed = await stack.event(ctx["order_id"], "CaptureFailed")
    assert failed["payload"]["reason"] == "retry_budget_exhausted"
    txn = ctx["transaction_id"]
    alarm = _capture_row(stack, txn)
    assert alarm[0] in ("unknown", "in_flight")
    assert alarm[2] is not None  # alerted_at
    # a few more rounds after the alarm, each a look-up
    gets = stack.requests[(txn, "get")]
    await eventually(lambda: stack.requests[(txn, "get")] >= gets + 2, 30, "look-ups go on")
    assert _capture_row(stack, txn)[1] > CAPTURE_MAX_ATTEMPTS


async def test_a_capture_past_its_retry_budget_is_captured_once_the_gateway_recovers(
    stack: Stack,
) -> None:
    ctx = await stack.payment()
    txn = ctx["transaction_id"]
    stack.outage.update({(txn, "capture"), (txn, "get")})
    await stack.reserved(ctx)
    await _stalled(stack, ctx)
    stack.outage.difference_update({(txn, "capture"), (txn, "get")})
    captured = await stack.event(ctx["order_id"], "PaymentCaptured")
    ledger = stack.ledger(txn)
    assert len(ledger.captures) == 1
    assert captured["payload"]["capture_id"] == ledger.captures[0]["capture_id"]
    assert len(stack.of(ctx["order_id"], "CaptureFailed")) == 1  # the alarm, once
    assert _capture_row(stack, txn)[0] == "captured"


async def test_a_capture_past_its_retry_budget_found_voided_releases_and_voids(
    stack: Stack,
) -> None:
    ctx = await stack.payment()
    txn = ctx["transaction_id"]
    stack.outage.update({(txn, "capture"), (txn, "get")})
    await stack.reserved(ctx)
    await _stalled(stack, ctx)
    # meanwhile the authorization was voided at the gateway (say, by an operator)
    assert (await stack.sim.operate("void", txn, "operator-void", None))[0] == 200
    stack.outage.difference_update({(txn, "capture"), (txn, "get")})
    declined = await stack.event(ctx["order_id"], "CaptureDeclined")  # releases the stock
    assert declined["payload"]["decline_code"] == "authorization_voided"
    voided = await stack.event(ctx["order_id"], "AuthorizationVoided")
    assert voided["causation_id"] == declined["event_id"]
    ledger = stack.ledger(txn)
    assert (len(ledger.captures), len(ledger.voids), ledger.state) == (0, 1, "voided")
    assert len(stack.of(ctx["order_id"], "CaptureFailed")) == 1
    assert _capture_row(stack, txn)[0] == "declined"


async def test_a_capture_sent_before_the_hold_ran_out_is_not_expired(stack: Stack) -> None:
    """The first capture may land late: a look-up past the hold that still shows the
    authorization re-sends the capture under its key instead of expiring it."""
    margin_s = 6.0
    ctx = await stack.payment()
    txn = ctx["transaction_id"]
    stack.outage.update({(txn, "capture"), (txn, "get")})
    authorized = datetime.now(UTC) - timedelta(days=6) + timedelta(seconds=margin_s)
    hold_ends = time.monotonic() + margin_s
    await stack.reserved(ctx, occurred_at=authorized.isoformat().replace("+00:00", "Z"))
    await eventually(lambda: stack.requests[(txn, "capture")] >= 1, margin_s - 2, "capture sent")
    await eventually(lambda: time.monotonic() > hold_ends + 1, margin_s + 2, "the hold passes")
    stack.outage.discard((txn, "get"))  # look-ups answer `authorized` now; captures still fail
    sent = stack.requests[(txn, "capture")]
    await eventually(
        lambda: (
            stack.requests[(txn, "capture")] > sent
            or stack.of(ctx["order_id"], "AuthorizationExpired")
        ),
        30,
        "a round after the hold",
    )
    assert not stack.of(ctx["order_id"], "AuthorizationExpired")
    stack.outage.discard((txn, "capture"))
    await stack.event(ctx["order_id"], "PaymentCaptured")
    assert not stack.of(ctx["order_id"], "AuthorizationExpired")
    ledger = stack.ledger(txn)
    assert (len(ledger.captures), len(ledger.voids)) == (1, 0)


async def test_a_capture_of_another_amount_goes_to_reconciliation(stack: Stack) -> None:
    ctx = await stack.payment()
    txn = ctx["transaction_id"]
    # a partial capture made outside paysaga
    outside = CaptureRequest(amount=500, currency="EUR")
    assert (await stack.sim.operate("capture", txn, "outside-capture", outside))[0] == 200
    await stack.reserved(ctx)
    failed = await stack.event(ctx["order_id"], "CaptureFailed")
    assert failed["payload"]["reason"] == "amount_mismatch"
    assert not stack.of(ctx["order_id"], "PaymentCaptured")
    assert _capture_row(stack, txn)[0] == "failed"
    assert len(stack.ledger(txn).captures) == 1
