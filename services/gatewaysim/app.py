"""The gateway simulator: a test double of the payment gateway (docs/contract.md §4).

The ledger lives in memory and is lost on restart. Semantics, modelled on real gateways:

- ``Idempotency-Key`` is required on every mutating call. A key's first *executed*
  result (200 or 402) is stored with a fingerprint of the request and returned again for
  the same key; the same key on a different request answers 400
  ``idempotency_key_reused``. 5xx, 404 and validation errors execute nothing and are not
  stored, so retrying them with the same key is meaningful.
- Doing an operation again under a *new* key is a conflict, never a decline: capturing
  a captured transaction (or a sale) answers 409 ``already_captured``, refunding a
  refunded one 409 ``already_refunded``, and capturing or voiding in any other state
  than ``authorized`` 409 ``invalid_state``. A decline (402) would tell the caller the
  money was not taken when it was. Exception: voiding a voided authorization answers
  200 again (nothing left to release). A refund of a transaction that is not captured
  answers 402 ``not_captured``.
- Markers in the payment_intent_id, like a gateway's test cards, with ``<op>`` one of
  ``capture``/``void``/``refund``: ``_<op>_declined`` → 402 ``<op>_declined``;
  ``_<op>_flaky`` → the first ``flaky_failures`` (2) calls of that op answer 503;
  ``_<op>_lost`` → the first successful call is applied, then its answer is held back
  ``lost_response_delay_s`` (longer than any client timeout; a replay of the key
  answers at once); ``_slow`` → every call on the transaction takes ``slow_delay_s``.

Requested payments (docs/contract.md §3.7): ``POST /v1/payment_intents`` creates one (idempotent
by key like every mutating call; the answer carries the ``client_secret``, which
``GET /v1/payment_intents/{id}`` never shows again), and ``POST
/sim/payment_intents/{id}/confirm`` is the customer completing the payment page: then
as ``POST /sim/payments`` for that intent. Markers in the *order id* choose request
failures: ``_request_declined`` → 402 ``request_declined``; ``_request_flaky`` → the
first ``flaky_failures`` calls answer 503; ``_request_down`` → every call answers 503;
``_request_lost`` → the first call creates the payment, then its answer is held back
like ``_<op>_lost``.

``POST /sim/payments`` records a transaction and emits its webhook: the body is
serialized once and those exact bytes are signed with the gateway's first secret and
delivered to the bridge in a background task, retried until the bridge answers 2xx
(docs/contract.md §4), with jittered exponential backoff capped at ``delivery_backoff_max_s``.
By default it never gives up; ``delivery_give_up_s`` (``PAYSAGA_DELIVERY_GIVE_UP_S``)
optionally abandons a delivery after that many seconds. Each delivery attempt is
re-signed with its own timestamp, as real gateways do, so a late retry does not fall
outside the bridge's tolerance; the first attempt carries the returned signature.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import quote

import httpx
import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.logs import configure_logging
from services.runtime.retry import backoff_s
from services.runtime.settings import LOCAL_DEV_GATEWAY_SECRETS
from services.runtime.signature import sign

log = logging.getLogger(__name__)

Operation = Literal["capture", "void", "refund"]
TxnState = Literal["authorized", "captured", "voided", "refunded", "failed"]
EVENT_TYPES = {
    "authorize": "payment.authorized",
    "sale": "payment.captured",
    "decline": "payment.failed",
}
INITIAL_STATES: dict[str, TxnState] = {
    "authorize": "authorized",
    "sale": "captured",
    "decline": "failed",
}
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]
Reply = tuple[int, dict[str, Any]]


class GatewaySimSettings(BaseSettings):
    """``PAYSAGA_*`` settings of the simulator. Unlike the services, the simulator may
    default ``PAYSAGA_GATEWAY_SECRETS`` to the documented local development secret."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    gatewaysim_host: str = "127.0.0.1"
    gatewaysim_port: int = 8090
    gateway_id: str = "simgw"
    gateway_secrets: dict[str, list[str]] = Field(
        default_factory=lambda: json.loads(LOCAL_DEV_GATEWAY_SECRETS)
    )
    bridge_url: str = "http://127.0.0.1:8070"
    lost_response_delay_s: float = 30.0
    slow_delay_s: float = 2.0
    flaky_failures: int = 2
    delivery_timeout_s: float = 5.0
    delivery_backoff_base_s: float = 0.5
    delivery_backoff_max_s: float = 15.0
    #: None: retry delivery until the bridge answers 2xx (docs/contract.md §4)
    delivery_give_up_s: float | None = None

    @model_validator(mode="after")
    def _can_sign(self) -> GatewaySimSettings:
        if not (self.gateway_secrets.get(self.gateway_id) or [""])[0]:
            raise ValueError(f"PAYSAGA_GATEWAY_SECRETS has no secret for {self.gateway_id!r}")
        return self


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


def delivery_delay(
    settings: GatewaySimSettings, attempts: int, elapsed_s: float, jitter: float
) -> float | None:
    """Seconds to wait before the next webhook delivery after ``attempts`` failed ones,
    ``elapsed_s`` after the first: exponential from ``delivery_backoff_base_s``, capped at
    ``delivery_backoff_max_s``, times 0.5..1 (``jitter`` in [0, 1)). None — give up —
    only when ``delivery_give_up_s`` is set and the next attempt would come after it."""
    delay = backoff_s(
        attempts, settings.delivery_backoff_base_s, settings.delivery_backoff_max_s, jitter
    )
    give_up = settings.delivery_give_up_s
    return None if give_up is not None and elapsed_s + delay > give_up else delay


def _error(status: int, code: str, message: str) -> Reply:
    return status, {"error": {"code": code, "message": message}}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Simulator:
    """The ledger and the rules. Between the idempotency lookup and storing the result
    there is no ``await``, so concurrent requests with one key execute once."""

    def __init__(self, settings: GatewaySimSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.ledger: dict[str, Transaction] = {}
        self.intents: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, tuple[tuple[Any, ...], Reply]] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.deliveries: set[asyncio.Task[None]] = set()
        self.http: httpx.AsyncClient | None = None
        self.rng = random.Random()

    async def operate(
        self, op: Operation, transaction_id: str, key: str | None, request: CaptureRequest | None
    ) -> Reply:
        txn = self.ledger.get(transaction_id)
        if txn is None:
            return _error(404, "not_found", f"no transaction {transaction_id}")
        pi = txn.payment_intent_id
        if "_slow" in pi:
            await asyncio.sleep(self.settings.slow_delay_s)
        if not key:
            return _error(400, "idempotency_key_required", "Idempotency-Key header is required")
        fingerprint = (op, transaction_id, request.model_dump() if request else None)
        if (stored := self.replies.get(key)) is not None:
            if stored[0] != fingerprint:
                return _error(400, "idempotency_key_reused", "key used for another request")
            return stored[1]
        self.calls[(transaction_id, op)] += 1
        if (
            f"_{op}_flaky" in pi
            and self.calls[(transaction_id, op)] <= self.settings.flaky_failures
        ):
            return _error(503, "temporarily_unavailable", "simulated outage")
        reply = self._operate(op, txn, request)
        if reply[0] in (200, 402):
            self.replies[key] = (fingerprint, reply)
        log.info("%s %s key=%s -> %d", op, transaction_id, key, reply[0])
        if reply[0] == 200 and f"_{op}_lost" in pi:
            await asyncio.sleep(self.settings.lost_response_delay_s)
        return reply

    def _operate(self, op: Operation, txn: Transaction, request: CaptureRequest | None) -> Reply:
        now = int(self.clock())
        declined = f"_{op}_declined" in txn.payment_intent_id
        if op == "void":
            if txn.state == "voided":
                return 200, {"status": "voided"}
            if txn.state != "authorized":
                return _error(409, "invalid_state", f"cannot void a {txn.state} payment")
            if declined:
                return _error(402, "void_declined", "simulated void decline")
            txn.voids.append({"void_id": _new_id("void"), "created": now})
            txn.state = "voided"
            return 200, {"status": "voided"}
        assert request is not None  # capture and refund always carry a body
        if op == "capture" and txn.state == "captured":
            return _error(409, "already_captured", "already captured under another key")
        if op == "capture" and txn.state != "authorized":
            return _error(409, "invalid_state", f"cannot capture a {txn.state} payment")
        if op == "refund" and txn.state == "refunded":
            return _error(409, "already_refunded", "already refunded under another key")
        if op == "refund" and txn.state != "captured":
            return _error(402, "not_captured", f"cannot refund a {txn.state} payment")
        limit = txn.captures[-1]["amount"] if op == "refund" else txn.amount
        if request.currency != txn.currency or not 0 < request.amount <= limit:
            return _error(400, "amount_invalid", f"at most {limit} {txn.currency}")
        if declined:
            return _error(402, f"{op}_declined", f"simulated {op} decline")
        entry = {"amount": request.amount, "currency": request.currency, "created": now}
        if isinstance(request, RefundRequest):
            entry |= {"refund_id": _new_id("re"), "reason": request.reason}
            txn.refunds.append(entry)
            txn.state = "refunded"
            return 200, {"refund_id": entry["refund_id"], "status": "succeeded"}
        entry |= {"capture_id": _new_id("cap"), "via": "capture_call"}
        txn.captures.append(entry)
        txn.state = "captured"
        return 200, {"capture_id": entry["capture_id"], "status": "captured"}

    async def create_intent(self, key: str | None, request: PaymentIntentRequest) -> Reply:
        """``POST /v1/payment_intents``: one payment per idempotency key, ever."""
        if not key:
            return _error(400, "idempotency_key_required", "Idempotency-Key header is required")
        fingerprint = ("payment_intent", *request.model_dump().values())
        if (stored := self.replies.get(key)) is not None:
            if stored[0] != fingerprint:
                return _error(400, "idempotency_key_reused", "key used for another request")
            return stored[1]
        order = request.order_id
        self.calls[(order, "request")] += 1
        if "_request_down" in order or (
            "_request_flaky" in order
            and self.calls[(order, "request")] <= self.settings.flaky_failures
        ):
            return _error(503, "temporarily_unavailable", "simulated outage")
        if "_request_declined" in order:
            reply = _error(402, "request_declined", "simulated refusal of the payment request")
        else:
            intent = {
                "id": _new_id("pi"),
                **request.model_dump(),
                "status": "requires_confirmation",
                "created": int(self.clock()),
                "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock() + 3600)),
                "transactions": [],
            }
            self.intents[intent["id"]] = intent
            reply = (
                200,
                {
                    "id": intent["id"],
                    "client_secret": f"{intent['id']}_secret_{secrets.token_hex(12)}",
                    "status": "requires_confirmation",
                    "expires_at": intent["expires_at"],
                },
            )
        self.replies[key] = (fingerprint, reply)
        log.info("payment intent for %s key=%s -> %d", order, key, reply[0])
        if reply[0] == 200 and "_request_lost" in order and self.calls[(order, "request")] == 1:
            await asyncio.sleep(self.settings.lost_response_delay_s)
        return reply

    def confirm_intent(self, payment_intent_id: str, request: ConfirmRequest) -> Reply:
        """The customer completed the payment page of a requested payment."""
        intent = self.intents.get(payment_intent_id)
        if intent is None:
            return _error(404, "not_found", f"no payment intent {payment_intent_id}")
        payment = self.create_payment(
            SimPaymentRequest(
                order_id=intent["order_id"],
                payment_intent_id=payment_intent_id,
                amount=intent["amount"],
                currency=intent["currency"],
                mode=request.mode,
                deliver=request.deliver,
            )
        )
        intent["transactions"].append(payment["transaction_id"])
        intent["status"] = {
            "authorize": "requires_capture",
            "sale": "succeeded",
            "decline": "requires_payment_method",
        }[request.mode]
        return 200, payment

    def create_payment(self, request: SimPaymentRequest) -> dict[str, Any]:
        created = int(self.clock())
        txn = Transaction(
            transaction_id=_new_id("txn"),
            order_id=request.order_id,
            payment_intent_id=request.payment_intent_id,
            amount=request.amount,
            currency=request.currency,
            state=INITIAL_STATES[request.mode],
            event_id=_new_id("evt"),
        )
        if request.mode == "sale":
            # "via" tells a sale's own charge from a capture call in the ledger
            capture = {
                "amount": txn.amount,
                "currency": txn.currency,
                "created": created,
                "via": "sale",
            }
            txn.captures.append(capture | {"capture_id": _new_id("cap")})
        data: dict[str, Any] = {
            "transaction_id": txn.transaction_id,
            "payment_intent_id": txn.payment_intent_id,
            **({"order_id": txn.order_id} if txn.order_id is not None else {}),
            "amount": txn.amount,
            "currency": txn.currency,
            "payment_method": request.payment_method,
        }
        if request.mode == "decline":
            data |= {"failure_code": "card_declined", "failure_message": "Your card was declined."}
        data |= request.extra_data
        event = {
            "id": txn.event_id,
            "type": EVENT_TYPES[request.mode],
            "created": created,
            "data": data,
        }
        raw = json.dumps(event, separators=(",", ":")).encode()
        signature = sign(self._secret, created, raw)
        self.ledger[txn.transaction_id] = txn
        if request.deliver:
            txn.delivery = "pending"
            task = asyncio.get_running_loop().create_task(self._deliver(txn, raw, signature))
            self.deliveries.add(task)  # keep a reference: the loop holds tasks weakly
            task.add_done_callback(self.deliveries.discard)
        log.info("payment %s %s (%s)", txn.transaction_id, request.mode, txn.payment_intent_id)
        return {"transaction_id": txn.transaction_id, "body": raw.decode(), "signature": signature}

    @property
    def _secret(self) -> str:
        return self.settings.gateway_secrets[self.settings.gateway_id][0]

    async def _deliver(self, txn: Transaction, raw: bytes, signature: str) -> None:
        s = self.settings
        url = f"{s.bridge_url.rstrip('/')}/webhooks/{quote(s.gateway_id, safe='')}"
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.http is None:
            self.http = httpx.AsyncClient()
        while True:
            txn.delivery_attempts += 1
            if txn.delivery_attempts > 1:
                signature = sign(self._secret, int(self.clock()), raw)
            headers = {"content-type": "application/json", "paysaga-signature": signature}
            try:
                response = await self.http.post(
                    url, content=raw, headers=headers, timeout=s.delivery_timeout_s
                )
            except httpx.HTTPError as exc:
                outcome = repr(exc)
            else:
                if response.is_success:
                    txn.delivery = "delivered"
                    return
                outcome = f"HTTP {response.status_code}"
            delay = delivery_delay(
                s, txn.delivery_attempts, loop.time() - started, self.rng.random()
            )
            if delay is None:
                txn.delivery = "abandoned"
                log.error("webhook %s abandoned: %s", txn.event_id, outcome)
                return
            log.warning("webhook %s attempt %d: %s", txn.event_id, txn.delivery_attempts, outcome)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        for task in list(self.deliveries):
            task.cancel()
        await asyncio.gather(*self.deliveries, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()


def create_app(settings: GatewaySimSettings, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """Build the simulator's app with a fresh, empty ledger."""
    sim = Simulator(settings, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await sim.close()

    app = FastAPI(title="paysaga gateway simulator", lifespan=lifespan)
    app.state.simulator = sim

    def respond(reply: Reply) -> JSONResponse:
        return JSONResponse(reply[1], status_code=reply[0])

    @app.post("/v1/payments/{transaction_id}/capture")
    async def capture(
        transaction_id: str, body: CaptureRequest, key: IdempotencyKey = None
    ) -> JSONResponse:
        return respond(await sim.operate("capture", transaction_id, key, body))

    @app.post("/v1/payments/{transaction_id}/void")
    async def void(transaction_id: str, key: IdempotencyKey = None) -> JSONResponse:
        return respond(await sim.operate("void", transaction_id, key, None))

    @app.post("/v1/payments/{transaction_id}/refund")
    async def refund(
        transaction_id: str, body: RefundRequest, key: IdempotencyKey = None
    ) -> JSONResponse:
        return respond(await sim.operate("refund", transaction_id, key, body))

    @app.get("/v1/payments/{transaction_id}")
    async def get_payment(transaction_id: str) -> JSONResponse:
        txn = sim.ledger.get(transaction_id)
        if txn is None:
            return respond(_error(404, "not_found", f"no transaction {transaction_id}"))
        if "_slow" in txn.payment_intent_id:
            await asyncio.sleep(settings.slow_delay_s)
        return JSONResponse(asdict(txn))

    @app.post("/v1/payment_intents")
    async def create_payment_intent(
        body: PaymentIntentRequest, key: IdempotencyKey = None
    ) -> JSONResponse:
        return respond(await sim.create_intent(key, body))

    @app.get("/v1/payment_intents/{payment_intent_id}")
    async def get_payment_intent(payment_intent_id: str) -> JSONResponse:
        intent = sim.intents.get(payment_intent_id)
        if intent is None:
            return respond(_error(404, "not_found", f"no payment intent {payment_intent_id}"))
        return JSONResponse(intent)

    @app.post("/sim/payment_intents/{payment_intent_id}/confirm")
    async def confirm_payment_intent(payment_intent_id: str, body: ConfirmRequest) -> JSONResponse:
        return respond(sim.confirm_intent(payment_intent_id, body))

    @app.post("/sim/payments")
    async def sim_payment(body: SimPaymentRequest) -> dict[str, Any]:
        return sim.create_payment(body)

    @app.get("/sim/ledger")
    async def ledger() -> dict[str, Any]:
        return {
            "transactions": [asdict(t) for t in sim.ledger.values()],
            "payment_intents": list(sim.intents.values()),
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    """Run the simulator on ``PAYSAGA_GATEWAYSIM_HOST``:``PAYSAGA_GATEWAYSIM_PORT``."""
    configure_logging("gatewaysim")
    settings = GatewaySimSettings()
    uvicorn.run(
        create_app(settings),
        host=settings.gatewaysim_host,
        port=settings.gatewaysim_port,
        log_config=None,  # its lines through the one setup (services.runtime.logs)
    )


if __name__ == "__main__":
    main()
