"""A saga through the local broker's SASL_SSL listener (SCRAM-SHA-512, certificate of
the throwaway local CA): every service, the bridge and the CLI connect with
``PAYSAGA_KAFKA_SECURITY_PROTOCOL=SASL_SSL``. The bootstrap servers are the TLS port
only, so a client that ignored the settings could not connect at all."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from services import devstack
from services.devclient import envelope, new_id, produce, wait_for
from services.runtime.kafka import client_options
from services.runtime.settings import LOCAL_DEV_GATEWAY_SECRETS, KafkaSettings
from services.runtime.signature import sign
from tests.conftest import Infra
from tests.support.harness import REPO, Proc, free_port

pytestmark = pytest.mark.integration

PROFILE = devstack.PROFILES["test"]


@pytest.fixture
def secure(infra: Infra, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    if infra.bootstrap != PROFILE.bootstrap:
        pytest.skip("the SASL_SSL listener is the local broker's; this Kafka is another")
    env = devstack.secure_client_env(PROFILE)
    for k, v in env.items():  # the test's own clients (the checkout) connect securely too
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def services(infra: Infra, secure: dict[str, str]) -> Iterator[dict[str, int]]:
    ports = {name: free_port() for name in ("bridge", "payments", "inventory", "capture",
                                            "orders")}  # fmt: skip
    env = {
        **secure,
        "PAYSAGA_DATABASE_URL": infra.database_url,
        "PAYSAGA_GATEWAY_SECRETS": LOCAL_DEV_GATEWAY_SECRETS,
        "PAYSAGA_POLL_TIMEOUT_MS": "200",
        **{f"PAYSAGA_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    procs = [Proc(f"secure-{n}-{new_id('p')}", ["-m", f"services.{n}.app"], env).start()
             for n in ports]  # fmt: skip
    yield ports
    for p in procs:
        p.stop()


def test_a_saga_runs_through_sasl_ssl(infra: Infra, services: dict[str, int]) -> None:
    order_id, intent, sku = new_id("ord"), new_id("pi"), new_id("sku")
    stock = subprocess.run(
        [str(REPO / ".venv" / "bin" / "paysaga"), "stock", "set", sku, "5"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert stock.returncode == 0, stock.stdout + stock.stderr
    payload = {
        "order_id": order_id, "customer_id": "c1", "conference_id": None, "currency": "EUR",
        "items": [{"sku": sku, "quantity": 2, "unit_amount": 1500}], "discount_amount": 0,
        "delivery_fee": 0, "service_fee": 0, "total_amount": 3000,
        "payment_intent_id": intent, "payment_method": "card",
    }  # fmt: skip
    bootstrap = KafkaSettings().kafka_bootstrap_servers  # the SASL_SSL port
    asyncio.run(produce(bootstrap, "checkout.orders.v1",
                        [(order_id, envelope("OrderPlaced", payload))]))  # fmt: skip
    status_url = f"http://127.0.0.1:{services['orders']}/orders/{order_id}"

    def status() -> str | None:
        try:
            r = httpx.get(status_url, timeout=5)
        except httpx.HTTPError:
            return None
        return str(r.json()["status"]) if r.status_code == 200 else None

    wait_for(lambda: status() == "PENDING_PAYMENT", 90, "the order placed")
    now = int(time.time())
    body = json.dumps({
        "id": new_id("evt"), "type": "payment.captured", "created": now,
        "data": {"transaction_id": new_id("txn"), "payment_intent_id": intent,
                 "order_id": order_id, "amount": 3000, "currency": "EUR",
                 "payment_method": {"type": "card", "brand": "visa", "last4": "4242"}},
    }).encode()  # fmt: skip

    def posted() -> bool:
        try:
            r = httpx.post(
                f"http://127.0.0.1:{services['bridge']}/webhooks/simgw",
                content=body,
                headers={"paysaga-signature": sign("whsec_local_dev", now, body),
                         "content-type": "application/json"},
                timeout=15,
            )  # fmt: skip
        except httpx.HTTPError:
            return False
        return r.status_code == 202

    wait_for(posted, 60, "the bridge's acknowledgement")
    wait_for(lambda: status() == "PAID_CONFIRMED", 90, "PAID_CONFIRMED")


def test_a_wrong_password_is_refused(secure: dict[str, str]) -> None:
    settings = KafkaSettings(kafka_sasl_password="not-the-password")  # type: ignore[arg-type]

    async def connect() -> None:
        admin = AIOKafkaAdminClient(**client_options(PROFILE.secure_bootstrap, settings))
        try:
            await admin.start()
        finally:
            await admin.close()

    with pytest.raises(KafkaConnectionError):
        asyncio.run(connect())
