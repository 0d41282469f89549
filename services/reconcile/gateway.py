"""What ``paysaga reconcile --gateway`` asks the gateway: one look-up per transaction
(``GET /v1/payments/{id}``) and per requested payment (``GET /v1/payment_intents/{id}``)."""

from __future__ import annotations

from typing import Any

import httpx


def connect(gateway_url: str) -> httpx.Client:
    return httpx.Client(base_url=gateway_url, timeout=10)


def look_up(client: httpx.Client, txns: set[str]) -> dict[str, dict[str, Any] | None]:
    """The gateway's view of each transaction; None for one it does not know."""
    out: dict[str, dict[str, Any] | None] = {}
    for txn in sorted(txns):
        answer = client.get(f"/v1/payments/{txn}")
        if answer.status_code == 404:
            out[txn] = None
            continue
        answer.raise_for_status()
        out[txn] = answer.json()
    return out


def intent_transactions(client: httpx.Client, payment_intent_id: str) -> list[str] | None:
    """The transactions of a requested payment; None when the gateway does not know it."""
    answer = client.get(f"/v1/payment_intents/{payment_intent_id}")
    if answer.status_code == 404:
        return None
    answer.raise_for_status()
    return [t for t in answer.json().get("transactions") or [] if isinstance(t, str)]
