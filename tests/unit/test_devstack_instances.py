"""Several instances of a service in a local profile (services/devstack/profiles.py): the
first keeps the service's name, port, pid file and log; further ones have their own,
apart from every other process of every profile; ``down`` finds them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from services import devstack
from services.devstack import profiles

SCALING = {"payments", "inventory", "capture", "refunds", "orders"}


def _port(p: devstack.Profile, inst: devstack.ServiceInstance) -> int:
    return inst.port(profiles.service_port(p, inst.service))


def test_two_instances_of_each_consuming_service_and_one_of_the_others() -> None:
    one = devstack.service_instances(1)
    two = devstack.service_instances(2)
    assert [i.name for i in one] == [sp.name for sp in devstack.SERVICE_PROCESSES]
    assert {sp.name for sp in devstack.SERVICE_PROCESSES if sp.scales_out} == SCALING
    assert sorted(i.name for i in two if i.number == 2) == sorted(f"{n}-2" for n in SCALING)
    assert len(two) == len(one) + len(SCALING)
    with pytest.raises(ValueError, match="instances"):
        devstack.service_instances(0)


def test_the_first_instance_keeps_its_paths_and_the_second_has_its_own() -> None:
    p = devstack.PROFILES["bench"]
    payments = next(sp for sp in devstack.SERVICE_PROCESSES if sp.name == "payments")
    first, second = devstack.ServiceInstance(payments), devstack.ServiceInstance(payments, 2)
    assert first.pidfile(p) == p.root / "pids" / "payments.pid"
    assert first.log(p) == p.root / "logs" / "payments.log"
    assert second.pidfile(p) == p.root / "pids" / "payments-2.pid"
    assert second.log(p) == p.root / "logs" / "payments-2.log"
    assert first.marker == second.marker == "-m services.payments.app"
    assert _port(p, first) == profiles.service_port(p, payments)
    assert _port(p, second) == _port(p, first) + profiles.INSTANCE_PORT_STEP


@pytest.mark.parametrize("shift", [0, 1000, 3000])
def test_no_two_processes_share_a_port_within_or_across_shifted_bench_profiles(
    shift: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every service port of the most instances, and every Kafka and PostgreSQL port, of
    a bench profile moved by ``shift`` and of the one moved by the next shift (another
    checkout's) are all different."""
    ports: list[int] = []
    for s in (shift, shift + 1000):
        monkeypatch.setenv("PAYSAGA_BENCH_PORT_SHIFT", str(s))
        p = profiles._bench_profile()
        nodes = profiles.kafka_nodes(p)
        ports += [p.pg_port, *(n.port for n in nodes), *(n.controller_port for n in nodes)]
        ports += [n.secure_port for n in nodes]
        ports += [_port(p, i) for i in devstack.service_instances(profiles.MAX_INSTANCES)]
    assert len(ports) == len(set(ports))


def test_down_and_status_find_every_instance_that_has_a_pid_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profiles, "LOCAL", tmp_path)  # the profile's folder: tmp_path/bench
    p = devstack.PROFILES["bench"]
    (p.root / "pids").mkdir(parents=True)
    for name in ("payments-2", "payments-3", "orders-2", "payments-0", "payments-x", "bridgex-2"):
        (p.root / "pids" / f"{name}.pid").write_text("1")
    extra = {"payments": ["payments-2", "payments-3"], "orders": ["orders-2"]}
    assert [i.name for i in devstack.instances_on_disk(p)] == [
        name for sp in devstack.SERVICE_PROCESSES for name in [sp.name, *extra.get(sp.name, [])]
    ]
