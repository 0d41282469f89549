"""The saga's chaos scenarios run on the test profile's stack with short leases and
timeouts (a fault resolves within a scenario), started for them and stopped after
them (tests/e2e starts its own afterwards). ``PAYSAGA_CHAOS_SCALE`` multiplies orders
and fault cycles (``make chaos``); ``PAYSAGA_CHAOS_REPORT`` names a file that gets one
JSON line per scenario (tests/chaos/run.py prints them as a table)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import pytest

from services import devstack
from services.devclient import DevClient
from tests.conftest import Infra
from tests.support.faults import PROFILE, Stack

SCALE = max(1, int(os.environ.get("PAYSAGA_CHAOS_SCALE", "1")))

CHAOS_ENV = {
    "PAYSAGA_GATEWAY_TIMEOUT_S": "1",
    "PAYSAGA_LOST_RESPONSE_DELAY_S": "3",
    "PAYSAGA_POLL_TIMEOUT_MS": "200",
    "PAYSAGA_RELAY_POLL_S": "1",
    # a worker killed mid-call: its claim is taken over soon (above one round's worst case)
    "PAYSAGA_CAPTURE_LEASE_S": "15",
    "PAYSAGA_REFUNDS_LEASE_S": "15",
    "PAYSAGA_PAYMENTS_REQUEST_LEASE_S": "15",
    "PAYSAGA_CAPTURE_RETRY_MAX_S": "2",
    "PAYSAGA_REFUNDS_RETRY_MAX_S": "2",
    "PAYSAGA_CAPTURE_STALLED_RETRY_MAX_S": "3",
    "PAYSAGA_REFUNDS_STALLED_RETRY_MAX_S": "3",
    "PAYSAGA_PAYMENTS_REQUEST_RETRY_BASE_S": "0.5",
    "PAYSAGA_PAYMENTS_REQUEST_RETRY_MAX_S": "2",
    # a paused member loses its partitions within seconds
    "PAYSAGA_SESSION_TIMEOUT_MS": "6000",
    "PAYSAGA_HEARTBEAT_INTERVAL_MS": "1000",
}


@dataclasses.dataclass
class Chaos:
    stack: Stack
    client: DevClient


@pytest.fixture(scope="module")
def chaos(infra: Infra) -> Iterator[Chaos]:
    env = {**devstack.stack_env(PROFILE), **CHAOS_ENV}
    stack = Stack(env)
    stack.down()  # whatever runs was started with other settings
    stack.up()
    try:
        yield Chaos(stack, DevClient(infra.bootstrap, infra.database_url, env))
    finally:
        stack.down()


def report(line: dict[str, object]) -> None:
    path = os.environ.get("PAYSAGA_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
