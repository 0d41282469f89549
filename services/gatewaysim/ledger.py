"""The simulator's ledger and its rules (docs/contract.md §4), in memory: lost on restart.
Semantics, modelled on real gateways:

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

Requested payments (docs/contract.md §3.7): ``create_intent`` creates one (idempotent by
key like every mutating call; the answer carries the ``client_secret``, which the
intent's ``GET`` never shows again), and ``confirm_intent`` is the customer completing
the payment page: then as ``create_payment`` for that intent. Markers in the *order id*
choose request failures: ``_request_declined`` → 402 ``request_declined``;
``_request_flaky`` → the first ``flaky_failures`` calls answer 503; ``_request_down`` →
every call answers 503; ``_request_lost`` → the first call creates the payment, then its
answer is held back like ``_<op>_lost``.

``create_payment`` records a transaction and emits its webhook (``webhooks.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from services.gatewaysim.models import (
    CaptureRequest,
    ConfirmRequest,
    Operation,
    PaymentIntentRequest,
    RefundRequest,
    Reply,
    SimPaymentRequest,
    Transaction,
    TxnState,
    error,
)
from services.gatewaysim.settings import GatewaySimSettings
from services.gatewaysim.webhooks import Webhooks

log = logging.getLogger("paysaga.gatewaysim")

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
        self.webhooks = Webhooks(settings, clock)

    async def operate(
        self, op: Operation, transaction_id: str, key: str | None, request: CaptureRequest | None
    ) -> Reply:
        txn = self.ledger.get(transaction_id)
        if txn is None:
            return error(404, "not_found", f"no transaction {transaction_id}")
        pi = txn.payment_intent_id
        if "_slow" in pi:
            await asyncio.sleep(self.settings.slow_delay_s)
        if not key:
            return error(400, "idempotency_key_required", "Idempotency-Key header is required")
        fingerprint = (op, transaction_id, request.model_dump() if request else None)
        if (stored := self.replies.get(key)) is not None:
            if stored[0] != fingerprint:
                return error(400, "idempotency_key_reused", "key used for another request")
            return stored[1]
        self.calls[(transaction_id, op)] += 1
        if (
            f"_{op}_flaky" in pi
            and self.calls[(transaction_id, op)] <= self.settings.flaky_failures
        ):
            return error(503, "temporarily_unavailable", "simulated outage")
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
                return error(409, "invalid_state", f"cannot void a {txn.state} payment")
            if declined:
                return error(402, "void_declined", "simulated void decline")
            txn.voids.append({"void_id": _new_id("void"), "created": now})
            txn.state = "voided"
            return 200, {"status": "voided"}
        assert request is not None  # capture and refund always carry a body
        if op == "capture" and txn.state == "captured":
            return error(409, "already_captured", "already captured under another key")
        if op == "capture" and txn.state != "authorized":
            return error(409, "invalid_state", f"cannot capture a {txn.state} payment")
        if op == "refund" and txn.state == "refunded":
            return error(409, "already_refunded", "already refunded under another key")
        if op == "refund" and txn.state != "captured":
            return error(402, "not_captured", f"cannot refund a {txn.state} payment")
        limit = txn.captures[-1]["amount"] if op == "refund" else txn.amount
        if request.currency != txn.currency or not 0 < request.amount <= limit:
            return error(400, "amount_invalid", f"at most {limit} {txn.currency}")
        if declined:
            return error(402, f"{op}_declined", f"simulated {op} decline")
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
            return error(400, "idempotency_key_required", "Idempotency-Key header is required")
        fingerprint = ("payment_intent", *request.model_dump().values())
        if (stored := self.replies.get(key)) is not None:
            if stored[0] != fingerprint:
                return error(400, "idempotency_key_reused", "key used for another request")
            return stored[1]
        order = request.order_id
        self.calls[(order, "request")] += 1
        if "_request_down" in order or (
            "_request_flaky" in order
            and self.calls[(order, "request")] <= self.settings.flaky_failures
        ):
            return error(503, "temporarily_unavailable", "simulated outage")
        if "_request_declined" in order:
            reply = error(402, "request_declined", "simulated refusal of the payment request")
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
            return error(404, "not_found", f"no payment intent {payment_intent_id}")
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
        signature = self.webhooks.sign(raw, created)
        self.ledger[txn.transaction_id] = txn
        if request.deliver:
            self.webhooks.deliver(txn, raw, signature)
        log.info("payment %s %s (%s)", txn.transaction_id, request.mode, txn.payment_intent_id)
        return {"transaction_id": txn.transaction_id, "body": raw.decode(), "signature": signature}

    async def close(self) -> None:
        await self.webhooks.close()
