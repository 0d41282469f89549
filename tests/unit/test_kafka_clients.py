"""Every Kafka client is built through ``client_options`` (so a secured cluster secures
all of them), and every producer is ``acks=all`` and idempotent (no acknowledged record
lost when a leader dies, no duplicate from a retried send), but the monitor's faust
producer, which is ``acks=all`` only."""

from __future__ import annotations

import ast
import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.runtime.kafka import client_options
from services.runtime.settings import KafkaSettings

REPO = Path(__file__).resolve().parents[2]
CLIENTS = ("AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient")


def _client_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for path in sorted([*REPO.glob("services/**/*.py"), *REPO.glob("benchmarks/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in CLIENTS:
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return calls


def test_every_kafka_client_is_built_from_client_options() -> None:
    calls = _client_calls()
    assert len(calls) >= 10  # the scan finds them
    for where, call in calls:
        spread = [k.value for k in call.keywords if k.arg is None and isinstance(k.value, ast.Call)]
        assert any(getattr(c.func, "id", None) == "client_options" for c in spread), where
        assert "bootstrap_servers" not in {k.arg for k in call.keywords}, where


def test_every_producer_waits_for_all_replicas_and_is_idempotent() -> None:
    producers = [(w, c) for w, c in _client_calls() if getattr(c.func, "id", "") == CLIENTS[0]]
    assert producers
    for where, call in producers:
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        acks, idem = kw.get("acks"), kw.get("enable_idempotence")
        assert isinstance(acks, ast.Constant), where
        assert acks.value == "all", where
        assert isinstance(idem, ast.Constant), where
        assert idem.value is True, where


def test_the_monitor_producer_waits_for_all_replicas() -> None:
    """The monitor's faust producer: what faust hands aiokafka (``_settings_default``
    plus ``_settings_extra``, as its ``_new_producer`` does). faust turns idempotence on
    only with ``processing_guarantee="exactly_once"`` (transactions), which the monitor
    does not use: its producer is ``acks=all`` without idempotence, as the README says."""
    from faust.types.enums import ProcessingGuarantee
    from prometheus_client import CollectorRegistry

    from services.monitor.app import Monitor, MonitorSettings

    app = Monitor(MonitorSettings(), CollectorRegistry()).app
    producer = app.producer
    options = {**producer._settings_default(), **producer._settings_extra()}
    assert options["acks"] == -1  # aiokafka's "all"
    assert app.conf.processing_guarantee == ProcessingGuarantee.AT_LEAST_ONCE
    assert "enable_idempotence" not in options  # if faust ever adds it, fix the README


def test_plaintext_by_default() -> None:
    opts = client_options("b:9092", KafkaSettings())
    assert opts == {"bootstrap_servers": "b:9092", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_scram(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSAGA_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PAYSAGA_KAFKA_SASL_USERNAME", "payments")
    monkeypatch.setenv("PAYSAGA_KAFKA_SASL_PASSWORD", "s3cret")
    opts = client_options("b:9092")
    assert opts["security_protocol"] == "SASL_SSL"
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("payments", "s3cret")
    ctx = opts["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert "s3cret" not in repr(KafkaSettings())


def test_sasl_without_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSAGA_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError, match="PAYSAGA_KAFKA_SASL_USERNAME"):
        KafkaSettings()


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_SSL"])
def test_the_monitor_connects_as_every_other_client(
    monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    """faust takes credentials, not aiokafka options: what it hands aiokafka must be
    what ``client_options`` gives every other client."""
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from services.monitor.app import MonitorSettings, broker_credentials

    monkeypatch.setenv("PAYSAGA_KAFKA_SECURITY_PROTOCOL", protocol)
    monkeypatch.setenv("PAYSAGA_KAFKA_SASL_USERNAME", "monitor")
    monkeypatch.setenv("PAYSAGA_KAFKA_SASL_PASSWORD", "s3cret")
    settings = MonitorSettings()
    faust_opts = dict(credentials_to_aiokafka_auth(broker_credentials(settings)))
    ours = client_options(settings.kafka_bootstrap_servers, settings)
    ours.pop("bootstrap_servers")
    assert faust_opts.keys() == ours.keys()
    for key in ours.keys() - {"ssl_context"}:
        assert faust_opts[key] == ours[key], key
    if protocol == "SASL_SSL":
        assert isinstance(faust_opts["ssl_context"], ssl.SSLContext)
        assert faust_opts["ssl_context"].verify_mode == ssl.CERT_REQUIRED
