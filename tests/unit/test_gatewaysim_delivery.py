"""Webhook delivery of the gateway simulator: retried until the bridge answers 2xx
(docs/contract.md §4), however long that takes, unless a give-up is configured."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from services.gatewaysim.ledger import Simulator
from services.gatewaysim.models import SimPaymentRequest
from services.gatewaysim.settings import GatewaySimSettings
from services.gatewaysim.webhooks import delivery_delay

HOUR = 3600.0


def test_by_default_delivery_never_gives_up_and_backs_off_to_the_cap() -> None:
    settings = GatewaySimSettings()
    assert settings.delivery_give_up_s is None
    for attempts, elapsed in ((1, 0.0), (5, 300.0), (1000, 30 * 24 * HOUR)):
        delay = delivery_delay(settings, attempts, elapsed, jitter=0.999)
        assert delay is not None
        assert delay <= settings.delivery_backoff_max_s
    assert delivery_delay(settings, 1, 0.0, jitter=0.0) == settings.delivery_backoff_base_s / 2


def test_an_optional_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSAGA_DELIVERY_GIVE_UP_S", "600")
    settings = GatewaySimSettings()
    assert settings.delivery_give_up_s == 600
    assert delivery_delay(settings, 3, 100.0, jitter=0.5) is not None
    assert delivery_delay(settings, 30, 599.0, jitter=0.5) is None


def _deliver_through_an_outage(outage_s: float, **settings: Any) -> tuple[str, int]:
    """A bridge that answers 503 for ``outage_s`` (the event loop's clock is moved on by
    a minute per call) and 200 afterwards; returns the delivery state and attempts."""

    async def scenario() -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        real, skipped = loop.time, [0.0]
        loop.time = lambda: real() + skipped[0]  # type: ignore[method-assign]

        def bridge(_: httpx.Request) -> httpx.Response:
            skipped[0] += 60.0
            return httpx.Response(503 if skipped[0] <= outage_s else 200)

        fast = {"delivery_backoff_base_s": 0.001, "delivery_backoff_max_s": 0.002}
        sim = Simulator(GatewaySimSettings(**fast, **settings), time.time)
        sim.webhooks.http = httpx.AsyncClient(transport=httpx.MockTransport(bridge))
        request = SimPaymentRequest(
            order_id="ord_1", payment_intent_id="pi_1", amount=100, currency="EUR", mode="sale"
        )
        txn = sim.ledger[sim.create_payment(request)["transaction_id"]]
        deadline = real() + 10
        while txn.delivery == "pending" and real() < deadline:
            await asyncio.sleep(0.001)
        await sim.close()
        return txn.delivery, txn.delivery_attempts

    return asyncio.run(scenario())


def test_a_webhook_is_delivered_after_an_outage_of_hours() -> None:
    assert _deliver_through_an_outage(2 * HOUR) == ("delivered", 121)


def test_a_configured_give_up_abandons_the_webhook() -> None:
    state, attempts = _deliver_through_an_outage(2 * HOUR, delivery_give_up_s=600.0)
    assert state == "abandoned"
    assert attempts <= 11
