"""The running stack, driven only through the contract (see services/devclient.py).

The stack is started once, lazily, by the first e2e test — after the unit and
integration tests, whose own service processes use the same consumer groups."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from services import devstack
from services.devclient import DevClient, new_id
from tests.conftest import Infra
from tests.support.harness import REPO

pytestmark = pytest.mark.e2e

Stack = DevClient
CONSOLE_OPERATOR, CONSOLE_SECRET = "e2e-operator", "console-e2e-secret"
__all__ = ["MONITOR_ENV", "Stack", "new_id", "paysaga"]

#: the monitor judges within a test: a reserved order waiting for capture is stalled
#: after 4 s (tests/e2e/test_monitor.py stops capture), checked twice a second
MONITOR_ENV = {
    "PAYSAGA_MONITOR_STALL_AFTER_INVENTORY_RESERVED_S": "4",
    "PAYSAGA_MONITOR_CHECK_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="session")
def stack(infra: Infra) -> Iterator[DevClient]:
    profile = devstack.PROFILES["test"]
    env = devstack.stack_env(profile)
    env.update(
        {
            # small delays so failure paths (lost responses, timeouts) resolve within a test
            "PAYSAGA_GATEWAY_TIMEOUT_S": "1",
            "PAYSAGA_LOST_RESPONSE_DELAY_S": "3",
            "PAYSAGA_POLL_TIMEOUT_MS": "200",
            "PAYSAGA_RELAY_POLL_S": "1",
            # payment requests: a gateway that stays down reaches its budget within a test
            "PAYSAGA_PAYMENTS_REQUEST_MAX_ATTEMPTS": "3",
            "PAYSAGA_PAYMENTS_REQUEST_RETRY_BASE_S": "0.5",
            "PAYSAGA_PAYMENTS_REQUEST_RETRY_MAX_S": "1",
            # two secrets for simgw, as during a rotation (the simulator signs with the first)
            "PAYSAGA_GATEWAY_SECRETS": json.dumps({"simgw": ["whsec_local_dev", "whsec_rotated"]}),
            **MONITOR_ENV,
            # the operator console may act (tests/e2e/test_console*.py)
            "PAYSAGA_CONSOLE_TOKEN": f"{CONSOLE_OPERATOR}:{CONSOLE_SECRET}",
        }
    )
    devstack.services_up(profile, env)
    yield DevClient(infra.bootstrap, infra.database_url, env)
    devstack.services_down(profile)


def paysaga(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``paysaga`` command against the stack (wide output: ids are not wrapped)."""
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "paysaga"), *args],
        env={**stack.env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
