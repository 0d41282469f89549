"""Client of the payment gateway API (docs/contract.md §4).

Capture, void and refund can time out after the gateway did the work, so the client
never turns doubt into failure (docs/architecture.md, "Calls to the gateway"):

- 200 → ``succeeded``; 402 → ``declined`` (permanent, with the gateway's code/message);
  404 → ``not_found``; any other 4xx → ``GatewayProtocolError`` (a bug on one side).
- 5xx and transport errors → retried with capped exponential backoff + jitter, always
  with the caller's same ``Idempotency-Key``; an exhausted budget → ``unknown``.
- A read/write timeout → ``unknown`` at once: the request may have been applied, and
  the caller must ask ``get_payment`` before anything else is done to that payment
  (retrying blind would also multiply the time a consumer spends in one call).
  Connect and pool timeouts are retried instead: nothing reached the gateway.

Worst case per call: ``max_attempts * timeout_s`` per phase plus the backoff sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from services.runtime.metrics import GatewayMetrics
from services.runtime.retry import GatewayOutcome, OutcomeKind, backoff_s
from services.runtime.tracing import TRACEPARENT, current, set_attribute, span

__all__ = [
    "GatewayClient",
    "GatewayError",
    "GatewayNotFoundError",
    "GatewayOutcome",
    "GatewayProtocolError",
    "GatewayUnavailableError",
    "OutcomeKind",
]

log = logging.getLogger(__name__)

#: 4xx answers to a payment request that are not a refusal of it: retried, same key
TRANSIENT_4XX = frozenset({408, 409, 423, 425, 429})

Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")


class GatewayError(Exception):
    """Base class of the errors this client raises."""


class GatewayProtocolError(GatewayError):
    """Permanent: the gateway answered outside the contract (an unexpected 4xx, a body
    that is not a JSON object). Retrying the same request cannot help."""

    def __init__(self, status_code: int, body: Any, message: str = "") -> None:
        super().__init__(message or f"gateway answered {status_code}: {body!r}"[:500])
        self.status_code = status_code
        self.body = body


class GatewayNotFoundError(GatewayProtocolError):
    """``get_payment``: the gateway does not know the transaction."""


class GatewayUnavailableError(GatewayError):
    """Transient: ``get_payment`` exhausted its retry budget on 5xx, timeouts or
    transport errors."""


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class GatewayClient:
    """Async client over ``httpx.AsyncClient``; use as ``async with`` or call ``aclose``.

    ``rng`` draws the jitter and ``sleep`` waits between attempts, so tests run without
    clocks. ``transport`` replaces the network (``httpx.MockTransport`` in unit tests).
    ``metrics``: each call observed in ``paysaga_gateway_call_seconds{operation,outcome}``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 5.0,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        if max_attempts < 1 or timeout_s <= 0 or backoff_base_s < 0:
            raise ValueError("need max_attempts >= 1, timeout_s > 0, backoff_base_s >= 0")
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, transport=transport)
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._metrics = metrics

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def backoff(self, retry: int) -> float:
        """Delay before retry number ``retry`` (1-based): ``base * 2**(retry-1)`` capped at
        ``backoff_max_s``, then "equal jitter" (half fixed, half random) so that clients
        retrying together spread out but never retry immediately."""
        return backoff_s(retry, self._backoff_base_s, self._backoff_max_s, self._rng.random())

    async def capture(
        self, transaction_id: str, amount: int, currency: str, idempotency_key: str
    ) -> GatewayOutcome:
        """Capture an authorization (``POST /v1/payments/{id}/capture``)."""
        payload = {"amount": amount, "currency": currency}
        return await self._timed(
            "capture", self._mutate(transaction_id, "capture", payload, idempotency_key)
        )

    async def void(self, transaction_id: str, idempotency_key: str) -> GatewayOutcome:
        """Release an authorization (``POST /v1/payments/{id}/void``)."""
        return await self._timed(
            "void", self._mutate(transaction_id, "void", None, idempotency_key)
        )

    async def refund(
        self, transaction_id: str, amount: int, currency: str, reason: str, idempotency_key: str
    ) -> GatewayOutcome:
        """Refund a capture (``POST /v1/payments/{id}/refund``). Never call it again for
        the same money under a new key: resolve ``unknown`` with ``get_payment``."""
        payload = {"amount": amount, "currency": currency, "reason": reason}
        return await self._timed(
            "refund", self._mutate(transaction_id, "refund", payload, idempotency_key)
        )

    async def create_payment_intent(
        self, order_id: str, amount: int, currency: str, payment_method: str, idempotency_key: str
    ) -> GatewayOutcome:
        """Request a payment (``POST /v1/payment_intents``, docs/contract.md §3.7). Any 4xx with
        the gateway's ``{error: {code, message}}`` is a refusal (``declined``) — but for
        ``TRANSIENT_4XX`` (a conflict: the same key still being processed; a rate limit;
        a request timeout) and a 404 (the contract gives this call none: a misrouted
        request), which say nothing about the request and, like a lost answer, are
        ``unknown``: replay the same key, which returns the first result."""
        payload = {
            "order_id": order_id,
            "amount": amount,
            "currency": currency,
            "payment_method": payment_method,
        }
        return await self._timed(
            "payment_intent", self._request_payment(order_id, payload, idempotency_key)
        )

    async def _request_payment(
        self, order_id: str, payload: dict[str, Any], idempotency_key: str
    ) -> GatewayOutcome:
        try:
            outcome = await self._post("/v1/payment_intents", order_id, payload, idempotency_key)
        except GatewayProtocolError as exc:
            if exc.status_code in TRANSIENT_4XX:
                return GatewayOutcome("unknown", reason=f"http_{exc.status_code}")
            error = exc.body.get("error") if isinstance(exc.body, dict) else None
            if not 400 <= exc.status_code < 500 or not isinstance(error, dict):
                raise
            code, message = error.get("code"), error.get("message")
            return GatewayOutcome(
                "declined",
                exc.body,
                code=str(code) if code else f"http_{exc.status_code}",
                message=str(message) if message is not None else None,
            )
        if outcome.kind == "not_found":
            # the contract gives this call no 404: a wrong gateway URL or a proxy's answer,
            # not a refusal of this request — failing every order on it would be worse
            return GatewayOutcome(
                "unknown", outcome.body, attempts=outcome.attempts, reason="http_404"
            )
        return outcome

    async def get_payment(self, transaction_id: str) -> dict[str, Any]:
        """The gateway's view of a transaction (``GET /v1/payments/{id}``). Safe to
        repeat, so timeouts are retried too. Raises ``GatewayNotFoundError`` (404),
        ``GatewayProtocolError`` (other non-200) or ``GatewayUnavailableError``."""
        return await self._timed("lookup", self._get(self._path(transaction_id)))

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        """``call``, observed as one ``operation`` with its outcome (its kind; for a
        look-up ``succeeded`` or the error it raised)."""
        started, outcome = time.monotonic(), "error"
        try:
            result = await call
            outcome = result.kind if isinstance(result, GatewayOutcome) else "succeeded"
            return result
        except GatewayNotFoundError:
            outcome = "not_found"
            raise
        except GatewayProtocolError:
            outcome = "protocol_error"
            raise
        except GatewayUnavailableError:
            outcome = "unavailable"
            raise
        finally:
            if self._metrics is not None:
                elapsed = time.monotonic() - started
                self._metrics.calls.labels(operation, outcome).observe(elapsed)

    async def _get(self, url: str) -> dict[str, Any]:
        """A span per call (its retries inside), its traceparent sent along."""
        with span("gateway GET", current(), {"http.method": "GET", "url.path": url}) as tp:
            return await self._get_attempts(url, {TRACEPARENT: tp})

    async def _get_attempts(self, url: str, headers: dict[str, str]) -> dict[str, Any]:
        reason = ""
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                await self._sleep(self.backoff(attempt - 1))
            try:
                response = await self._http.get(url, headers=headers)
            except httpx.TransportError as exc:  # includes every TimeoutException
                reason = type(exc).__name__
                continue
            if response.status_code >= 500:
                reason = f"http_{response.status_code}"
                continue
            body = _json_object(response)
            if response.status_code == 404:
                raise GatewayNotFoundError(404, body or response.text)
            if response.status_code != 200 or body is None:
                raise GatewayProtocolError(response.status_code, body or response.text)
            return body
        raise GatewayUnavailableError(f"GET {url}: {reason}")

    @staticmethod
    def _path(transaction_id: str) -> str:
        return f"/v1/payments/{quote(transaction_id, safe='')}"

    async def _mutate(
        self, transaction_id: str, action: str, payload: dict[str, Any] | None, key: str
    ) -> GatewayOutcome:
        url = f"{self._path(transaction_id)}/{action}"
        return await self._post(url, transaction_id, payload, key, action)

    async def _post(
        self,
        url: str,
        subject: str,
        payload: dict[str, Any] | None,
        key: str,
        action: str = "request",
    ) -> GatewayOutcome:
        if not key:
            raise ValueError("an idempotency key is required")
        attributes = {"http.method": "POST", "url.path": url, "paysaga.operation": action}
        with span(f"gateway {action}", current(), attributes) as tp:
            outcome = await self._post_attempts(url, subject, payload, key, action, tp)
            set_attribute("paysaga.outcome", outcome.kind)
            return outcome

    async def _post_attempts(
        self,
        url: str,
        subject: str,
        payload: dict[str, Any] | None,
        key: str,
        action: str,
        traceparent: str,
    ) -> GatewayOutcome:
        headers = {"Idempotency-Key": key, TRACEPARENT: traceparent}
        reason = ""
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                await self._sleep(self.backoff(attempt - 1))
            try:
                response = await self._http.post(url, json=payload, headers=headers)
            except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                reason = type(exc).__name__  # never sent: as safe to retry as a refused connect
            except httpx.TimeoutException:
                log.warning("gateway %s %s timed out: outcome unknown", action, subject)
                return GatewayOutcome("unknown", attempts=attempt, reason="timeout")
            except httpx.TransportError as exc:
                reason = type(exc).__name__
            else:
                if response.status_code < 500:
                    return self._classify(response, attempt)
                reason = f"http_{response.status_code}"
            log.info("gateway %s %s attempt %d: %s", action, subject, attempt, reason)
        log.warning("gateway %s %s: budget exhausted (%s)", action, subject, reason)
        return GatewayOutcome("unknown", attempts=self._max_attempts, reason=reason)

    @staticmethod
    def _classify(response: httpx.Response, attempt: int) -> GatewayOutcome:
        body = _json_object(response)
        status = response.status_code
        if 200 <= status < 300 and body is not None:
            return GatewayOutcome("succeeded", body, attempts=attempt)
        if status == 402:
            error = (body or {}).get("error")
            error = error if isinstance(error, dict) else {}
            code, message = error.get("code"), error.get("message")
            return GatewayOutcome(
                "declined",
                body or {},
                code=str(code) if code is not None else "declined",
                message=str(message) if message is not None else None,
                attempts=attempt,
            )
        if status == 404:
            return GatewayOutcome("not_found", body or {}, attempts=attempt)
        raise GatewayProtocolError(status, body if body is not None else response.text)
