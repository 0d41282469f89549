"""The gateway bridge (docs/contract.md §2.2): a dumb pipe from a gateway's webhooks to Kafka.

``POST /webhooks/{gateway}`` appends the request body, byte for byte, to
``gateway.confirmations.v1``, keyed by the body's ``data.order_id`` (else
``data.payment_intent_id``), with the headers ``paysaga-gateway`` and
``paysaga-signature`` (the request's, verbatim) and ``traceparent`` (a child of the
request's ``traceparent``, or a new trace without one).

Guarantees:

* ``202`` only after the broker acknowledged the record (idempotent producer,
  ``acks=all``); anything else is an error status, so the gateway retries whatever was
  not stored. Kafka unavailable or slower than ``PAYSAGA_BRIDGE_PRODUCE_TIMEOUT_S``: 503.
* At least once, not exactly once: a gateway retry after a lost 202, or a produce that
  timed out here but was appended anyway, gives a second record. Payments dedupes by the
  gateway event id.
* It verifies nothing but the gateway id, the body size, the presence of a signature,
  that the body names a key — and that it carries no card data: a body with a card
  number or security code is refused with 422 and never written to Kafka, where it
  would be retained for days (PCI: card data must not be stored anywhere). Signature,
  tolerance, amount and order checks are the consumer's, on the raw bytes stored here.
  Bodies are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from schemas.carddata import find_card_data_in_bytes
from services.runtime.probes import add_probes
from services.runtime.producer import RenewingProducer
from services.runtime.service import configure_logging
from services.runtime.settings import GatewaySecrets, KafkaSettings
from services.runtime.topics import CONFIRMATIONS_TOPIC as TOPIC
from services.runtime.tracing import TRACEPARENT, span

log = logging.getLogger("paysaga.bridge")


class BridgeSettings(KafkaSettings, GatewaySecrets):
    """``PAYSAGA_*`` settings. ``PAYSAGA_GATEWAY_SECRETS`` is required; only its gateway
    ids are used here (the bridge verifies no signature)."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    bridge_host: str = "127.0.0.1"
    bridge_port: int = 8070
    bridge_max_body_bytes: int = 64 * 1024
    bridge_produce_timeout_s: float = 10.0


class KafkaLink:
    """The bridge's one idempotent producer, connected in the background and retried
    until the cluster answers: the HTTP side is up (answering 503) while Kafka is not,
    or while the producer is renewed after a failed send (services/runtime/producer.py)."""

    def __init__(self, bootstrap: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.producer = RenewingProducer(bootstrap, "paysaga-bridge", int(timeout_s * 1000))

    async def connect(self) -> None:
        await self.producer.connect()

    async def close(self) -> None:
        await self.producer.stop()

    async def send(self, key: str, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        """Append one record and wait for the broker's acknowledgement (RecordMetadata).
        Raises KafkaError or TimeoutError."""
        return await self.producer.send_and_wait(
            TOPIC, value, key.encode(), headers, timeout_s=self.timeout_s
        )

    async def ready(self) -> bool:
        """Connected, and a broker answers a metadata request now."""
        producer = self.producer.connected
        if producer is None:
            return False
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), 3)
        except (KafkaError, OSError, TimeoutError):
            return False
        return True


def record_key(body: bytes) -> str:
    """The record key of a webhook body: ``data.order_id`` if present, else
    ``data.payment_intent_id``. Raises ValueError when there is nothing to key it by."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise ValueError("body is not JSON") from exc
    data = doc.get("data") if isinstance(doc, dict) else None
    if isinstance(data, dict):
        for field in ("order_id", "payment_intent_id"):
            value = data.get(field)
            if isinstance(value, str) and value:
                return value
    raise ValueError(
        "body has neither data.order_id nor data.payment_intent_id: nothing to key the record by"
    )


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None once it grows past ``limit`` (a chunked body has no
    Content-Length to check up front)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_app(settings: BridgeSettings, link: KafkaLink | None = None) -> FastAPI:
    gateways = frozenset(settings.gateway_secrets)
    limit = settings.bridge_max_body_bytes
    link = link or KafkaLink(settings.kafka_bootstrap_servers, settings.bridge_produce_timeout_s)
    registry = CollectorRegistry()
    webhooks = Counter(
        "paysaga_bridge_webhooks_total",
        "Webhooks received, by outcome: accepted, unknown_gateway, too_large, "
        "missing_signature, card_number_present, security_code_present, no_key, "
        "kafka_unavailable",
        ["gateway", "outcome"],
        registry=registry,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        connecting = asyncio.create_task(link.connect())
        try:
            yield
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await link.close()

    app = FastAPI(title="paysaga gateway bridge", lifespan=lifespan)

    def reject(gateway: str, status: int, outcome: str, detail: str) -> JSONResponse:
        webhooks.labels(gateway, outcome).inc()
        return JSONResponse({"error": outcome, "detail": detail}, status_code=status)

    @app.post("/webhooks/{gateway}", status_code=202)
    async def webhook(gateway: str, request: Request) -> JSONResponse:
        if gateway not in gateways:
            # label "unknown": a label per guessed id would let callers grow the metrics
            return reject("unknown", 404, "unknown_gateway", f"unknown gateway {gateway!r}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return reject(gateway, 413, "too_large", f"body larger than {limit} bytes")
        # raw bytes: the signature must reach the consumer exactly as the gateway sent it
        signature = next((v for k, v in request.headers.raw if k == b"paysaga-signature"), b"")
        if not signature:
            return reject(gateway, 400, "missing_signature", "paysaga-signature header required")
        body = await _read_capped(request, limit)
        if body is None:
            return reject(gateway, 413, "too_large", f"body larger than {limit} bytes")
        card = find_card_data_in_bytes(body)
        if card is not None:
            log.warning("webhook of %s refused: %s (body not stored)", gateway, card)
            return reject(gateway, 422, card, "the webhook carries card data; it was not stored")
        try:
            key = record_key(body)
        except ValueError as exc:
            return reject(gateway, 400, "no_key", str(exc))
        headers = [("paysaga-gateway", gateway.encode()), ("paysaga-signature", signature)]
        # the record continues the request's trace (a new one without a valid traceparent)
        with span(f"bridge webhook {gateway}", request.headers.get(TRACEPARENT)) as tp:
            headers.append((TRACEPARENT, tp.encode()))
            try:
                meta = await link.send(key, body, headers)
            except (KafkaError, TimeoutError) as exc:
                log.warning("webhook of %s not stored: %r", gateway, exc)
                return reject(
                    gateway, 503, "kafka_unavailable", "could not store the webhook; retry"
                )
        webhooks.labels(gateway, "accepted").inc()
        return JSONResponse(
            {"status": "accepted", "topic": meta.topic, "partition": meta.partition,
             "offset": meta.offset},
            status_code=202,
        )  # fmt: skip

    async def readiness() -> tuple[dict[str, bool], list[str]]:
        return {"kafka": await link.ready()}, []

    add_probes(app, "bridge", registry, readiness)
    return app


def main() -> None:
    """Serve on ``PAYSAGA_BRIDGE_HOST``:``PAYSAGA_BRIDGE_PORT``; refuse to start without
    ``PAYSAGA_GATEWAY_SECRETS``."""
    configure_logging("bridge")
    try:
        settings = BridgeSettings()
    except SettingsError as exc:  # a value that is not JSON; the message omits the value
        sys.exit(f"bridge: invalid settings: {exc}")
    except ValidationError as exc:
        # without the inputs: they would print the gateway secrets
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False)
        )
        sys.exit(
            f"bridge: invalid settings: {problems} (PAYSAGA_GATEWAY_SECRETS is required: "
            'a JSON object like {"simgw": ["whsec_..."]})'
        )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.bridge_host,
        port=settings.bridge_port,
        log_level="warning",
        log_config=None,  # its lines through the one setup (services.runtime.logs)
    )


if __name__ == "__main__":
    main()
