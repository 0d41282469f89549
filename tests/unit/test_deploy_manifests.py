"""The deployment manifests (deploy/) agree with topics.yaml and with the code.

Strimzi resources are validated against the ``openAPIV3Schema`` of Strimzi 1.0.0's CRDs
(tests/fixtures/strimzi, descriptions stripped), Kubernetes objects with
``kubernetes-validate`` (the Kubernetes OpenAPI schemas it ships), strictly.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings
from typer.testing import CliRunner

from services import devstack
from services.bridge.app import BridgeSettings
from services.capture.app import CaptureSettings
from services.capture.app import build as build_capture
from services.cli import app as cli
from services.gatewaysim.settings import GatewaySimSettings
from services.inventory.app import InventorySettings
from services.inventory.app import build as build_inventory
from services.monitor.app import MonitorSettings
from services.orders.app import OrdersSettings
from services.orders.app import build as build_orders
from services.payments.app import PaymentsSettings
from services.payments.app import build as build_payments
from services.refunds.app import RefundsSettings
from services.refunds.app import build as build_refunds
from services.runtime import render
from services.runtime.consumer import RuntimeSettings
from services.runtime.dlq import dlq_topic
from services.runtime.intents.service import SharedSettings
from services.runtime.relay import RelaySettings
from services.runtime.render import acl, k8s, model, strimzi
from services.runtime.service import Service, configure_logging
from services.runtime.settings import (
    SERVICES,
    DatabaseSettings,
    GatewayClientSettings,
    GatewaySecrets,
    KafkaSettings,
)
from services.runtime.topics import TOPICS_FILE

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "strimzi"
K8S = render.DEPLOY / "k8s"
RAW: dict[str, Any] = yaml.safe_load(TOPICS_FILE.read_text())
TOPICS: dict[str, dict[str, Any]] = {n: t or {} for n, t in RAW["topics"].items()}
DEFAULTS: dict[str, Any] = RAW["defaults"]

# Who reads and writes what, spelt out (docs/contract.md §3 and docs/saga-events.md): the
# generator must give each user exactly this.
DLQ = {s: f"paysaga.{s}.dlq" for s in SERVICES}
EXPECTED: dict[str, dict[str, Any]] = {
    "paysaga-payments": {
        "group": "paysaga.payments",
        "reads": {
            "checkout.orders.v1",
            "gateway.confirmations.v1",
            "orders.status.v1",
            "payments.events.v1",  # its own PaymentIntentCreated: matches a parked payment
        },
        "writes": {"payments.events.v1", "audit.events.v1", "payments.requests.v1"},
    },
    "paysaga-inventory": {
        "group": "paysaga.inventory",
        "reads": {"catalog.stock.v1", "payments.events.v1", "capture.events.v1"},
        "writes": {"inventory.events.v1"},
    },
    "paysaga-capture": {
        "group": "paysaga.capture",
        "reads": {"inventory.events.v1"},
        "writes": {"capture.events.v1"},
    },
    "paysaga-refunds": {
        "group": "paysaga.refunds",
        "reads": {"inventory.events.v1", "capture.events.v1"},
        "writes": {"refunds.events.v1"},
    },
    "paysaga-orders": {
        "group": "paysaga.orders",
        "reads": {
            "payments.events.v1", "inventory.events.v1", "capture.events.v1",
            "refunds.events.v1", "audit.events.v1",
        },
        "writes": {"orders.status.v1", "customer.notifications.v1"},
    },
    "paysaga-bridge": {"group": None, "reads": set(), "writes": {"gateway.confirmations.v1"}},
    # the monitor: its table is recovered from its own changelog; no dead-letter topic
    "paysaga-monitor": {
        "group": "paysaga.monitor",
        "reads": {"orders.status.v1", "paysaga.monitor-sagas-changelog"},
        "writes": {"saga.stalled.v1", "paysaga.monitor-sagas-changelog"},
    },
    # the `paysaga` command: dlq list/show read every dead-letter topic (no group),
    # dlq replay/purge write to the failing group's one, stock set writes the catalog
    "paysaga-operator": {
        "group": None,
        "reads": set(DLQ.values()),
        "writes": {*DLQ.values(), "catalog.stock.v1"},
    },
}  # fmt: skip
for _s, _dlq in DLQ.items():  # a service reads and writes its own dead-letter topic
    EXPECTED[f"paysaga-{_s}"]["reads"].add(_dlq)
    EXPECTED[f"paysaga-{_s}"]["writes"].add(_dlq)


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def strimzi_docs() -> list[dict[str, Any]]:
    return docs_of(strimzi.render())


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# ------------------------------------------------------------------ topics.yaml ↔ code


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, Service]:
    """Every service wired as its main() wires it (engines are created, never connected)."""
    monkeypatch.setenv("PAYSAGA_GATEWAY_SECRETS", '{"simgw": ["whsec_test"]}')
    for s in (*SERVICES, "bridge"):
        monkeypatch.setenv(f"PAYSAGA_{s.upper()}_HOST", "0.0.0.0")
    return {
        "payments": build_payments(),
        "inventory": build_inventory(InventorySettings()),
        "capture": build_capture(CaptureSettings(), SharedSettings()),
        "refunds": build_refunds(RefundsSettings(), SharedSettings()),
        "orders": build_orders(OrdersSettings()),
    }


def test_each_service_consumes_exactly_the_topics_that_topics_yaml_names_it_for(
    built: dict[str, Service],
) -> None:
    topology = model.topology()
    for service, svc in built.items():
        consumed = {route.topic for route in svc.routes}
        declared = {t for t, (_, readers) in topology.items() if service in readers}
        assert consumed == declared, service
        assert svc.group == model.group_of(service)
        assert dlq_topic(svc.group) in TOPICS


def test_every_deployed_process_listens_on_its_configured_host(
    built: dict[str, Service],
) -> None:
    """In a pod the probes and Services reach the pod's address, not 127.0.0.1."""
    assert {s: svc.http_host for s, svc in built.items()} == dict.fromkeys(SERVICES, "0.0.0.0")
    assert BridgeSettings().bridge_host == "0.0.0.0"


def test_every_paysaga_name_in_topics_yaml_is_a_known_principal() -> None:
    named = {
        n
        for t in TOPICS.values()
        for n in [*model._names(t.get("producer")), *model._names(t.get("consumers"))]
    }
    paysaga = {n for n in named if n in SERVICES or n.startswith(("paysaga", "bridge"))}
    assert {model._principal(n) for n in paysaga} <= {*SERVICES, "bridge", "operator"}
    assert None not in {model._principal(n) for n in paysaga}


# ------------------------------------------------------------------ strimzi


def pruning(schema: Any) -> Any:
    """The schema with unknown fields refused: the API server would silently prune them
    (a misspelt field would be lost), except under ``x-kubernetes-preserve-unknown-fields``."""
    if isinstance(schema, list):
        return [pruning(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: pruning(v) for k, v in schema.items()}
    preserve = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def test_strimzi_resources_parse_and_match_their_crd_schemas() -> None:
    docs = strimzi_docs()
    schemas = {p.stem: json.loads(p.read_text()) for p in FIXTURES.glob("*.json")}
    assert set(schemas) == {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}
    assert {d["kind"] for d in docs} == set(schemas)
    for doc in docs:
        crd = schemas[doc["kind"]]
        assert doc["apiVersion"] == crd["apiVersion"]
        jsonschema.Draft7Validator(pruning(crd["schema"])).validate(doc)
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", name), name


def test_the_kafka_cluster_is_kraft_with_three_nodes_and_two_insync_replicas() -> None:
    docs = strimzi_docs()
    [pool] = by_kind(docs, "KafkaNodePool").values()
    [kafka] = by_kind(docs, "Kafka").values()
    assert pool["spec"]["replicas"] == 3
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    spec = kafka["spec"]["kafka"]
    assert spec["version"] == pom_kafka_version()
    assert spec["config"]["min.insync.replicas"] == 2
    assert spec["config"]["default.replication.factor"] == 3
    assert spec["authorization"] == {"type": "simple"}
    assert [listener["authentication"] for listener in spec["listeners"]] == [
        {"type": "scram-sha-512"}
    ]


def expected_configs(name: str) -> dict[str, str]:
    t = TOPICS[name]
    out = {
        "retention.ms": str(t.get("retention_ms", DEFAULTS["retention_ms"])),
        "cleanup.policy": str(t.get("cleanup_policy", "delete")),
        "min.insync.replicas": "2",
    }
    out.update({k: str(v) for k, v in (t.get("config") or {}).items()})
    return out


def test_every_topic_of_topics_yaml_is_a_kafka_topic_with_its_settings() -> None:
    topics = {d["spec"]["topicName"]: d for d in by_kind(strimzi_docs(), "KafkaTopic").values()}
    assert set(topics) == set(TOPICS)
    for name, doc in topics.items():
        spec = doc["spec"]
        assert spec["partitions"] == TOPICS[name].get("partitions", DEFAULTS["partitions"])
        assert spec["replicas"] == 3
        assert spec["config"] == expected_configs(name), name
    status = topics["orders.status.v1"]["spec"]["config"]
    assert status["cleanup.policy"] == "compact"
    assert status["min.compaction.lag.ms"] == "3600000"


def test_every_user_has_exactly_the_access_topics_yaml_gives_it() -> None:
    users = by_kind(strimzi_docs(), "KafkaUser")
    assert set(users) == set(EXPECTED)
    for name, user in users.items():
        assert user["spec"]["authentication"] == {"type": "scram-sha-512"}
        reads, writes, groups, cluster = set(), set(), set(), []
        for rule in user["spec"]["authorization"]["acls"]:
            r, ops = rule["resource"], set(rule["operations"])
            assert r["patternType"] == "literal"
            assert rule.get("host", "*") == "*"
            if r["type"] == "topic":
                assert ops <= {"Read", "Write", "Describe"}, rule
                assert "Describe" in ops, rule
                reads |= {r["name"]} if "Read" in ops else set()
                writes |= {r["name"]} if "Write" in ops else set()
            elif r["type"] == "group":
                assert ops == {"Read"}
                groups.add(r["name"])
            else:
                assert r["type"] == "cluster"
                cluster.append(ops)
        want = EXPECTED[name]
        assert reads == want["reads"], name
        assert writes == want["writes"], name
        assert groups == ({want["group"]} if want["group"] else set()), name
        assert cluster == [{"IdempotentWrite"}], name
        # and topics.yaml says so: consumers/producer name the service
        service = name.removeprefix("paysaga-")
        if service in SERVICES:
            consumers = {t for t, v in TOPICS.items() if service in v.get("consumers", [])}
            producers = {t for t, v in TOPICS.items() if service in str(v.get("producer"))}
            assert reads == consumers | {DLQ[service]}
            assert writes == producers | {DLQ[service]}


def acl_grants() -> dict[str, set[tuple[str, str, str]]]:
    """User -> (resource type, name, operation) of ``paysaga topics render --format acl``."""
    granted: dict[str, set[tuple[str, str, str]]] = {}
    for line in acl.render().splitlines():
        if line.startswith("kafka-acls.sh"):
            user = re.search(r"User:(\S+)", line)
            ops = re.findall(r"--operation (\w+)", line)
            res = re.search(r"--(topic|group) (\S+)$", line)
            assert user
            assert ops
            rtype, target = (res.group(1), res.group(2)) if res else ("cluster", "cluster")
            granted.setdefault(user.group(1), set()).update((rtype, target, op) for op in ops)
    return granted


def test_the_acl_commands_grant_what_the_kafka_users_grant() -> None:
    granted = {u: {(t, op) for _, t, op in g} for u, g in acl_grants().items()}
    for name, user in by_kind(strimzi_docs(), "KafkaUser").items():
        want = {
            (rule["resource"].get("name", "cluster"), op)
            for rule in user["spec"]["authorization"]["acls"]
            for op in rule["operations"]
        }
        assert granted[name] == want


def readme_acl_tables() -> list[dict[str, list[str]]]:
    """The README's ACL tables (header ``| user |`` or ``| principal |``): each row's
    principal (its first word, without ``paysaga-``) -> its cells after the first."""
    tables: list[dict[str, list[str]]] = []
    rows: dict[str, list[str]] | None = None
    for line in (render.DEPLOY.parent / "README.md").read_text(encoding="utf-8").splitlines():
        if re.match(r"\| (user|principal) \| .*Read", line, re.I):
            rows = {}
            tables.append(rows)
        elif rows is not None and line.startswith("|"):
            first, *cells = [c.strip() for c in line.strip("|").split("|")]
            if not set(first) <= {"-", " "}:
                rows[first.strip("`").split()[0].removeprefix("paysaga-")] = cells
        else:
            rows = None
    return tables


def named_topics(cell: str) -> set[str]:
    """The topics a README cell names: backquoted names with a dot; ``*`` and
    ``<service>`` stand for any part (``every `*.dlq```)."""
    known = {*TOPICS, *DLQ.values()}
    out: set[str] = set()
    for name in re.findall(r"`([^`\s]+\.[^`\s]+)`", cell):
        pattern = name.replace("<service>", "*")
        out |= {t for t in known if fnmatch.fnmatchcase(t, pattern)} if "*" in pattern else {name}
    return out


def test_the_readme_acl_tables_are_what_topics_render_generates() -> None:
    """An operator who sets ACLs by hand from the README gets what the generated
    ``deploy/kafka-acls.sh`` grants: every topic read and written, and the group."""
    want: dict[str, tuple[set[str], set[str], set[str]]] = {}
    for user, grants in acl_grants().items():
        topics = {(n, op) for r, n, op in grants if r == "topic"}
        want[user.removeprefix("paysaga-")] = (
            {n for n, op in topics if op == "Read"},
            {n for n, op in topics if op == "Write"},
            {n for r, n, _ in grants if r == "group"},
        )
    tables = readme_acl_tables()
    assert len(tables) == 2
    for rows in tables:
        assert set(rows) == set(want)
        for principal, (reads, writes, group) in rows.items():
            got = (named_topics(reads), named_topics(writes), named_topics(group))
            assert got == want[principal], principal


def test_topics_render_prints_each_format() -> None:
    runner = CliRunner()
    for fmt, fn in render.FORMATS.items():
        result = runner.invoke(cli, ["topics", "render", "--format", fmt])
        assert result.exit_code == 0, result.output
        assert result.output == fn()
    assert runner.invoke(cli, ["topics", "render", "--format", "helm"]).exit_code != 0


# ------------------------------------------------------------------ committed files


def test_the_committed_deploy_files_are_a_fresh_render() -> None:
    for path, text in render.deploy_files().items():
        assert path.exists(), f"{path} missing: run `paysaga topics render --write`"
        assert path.read_text() == text, f"{path} drifted: run `paysaga topics render --write`"
    generated = {p for p in (K8S / "base").iterdir()}
    assert generated == {p for p in render.deploy_files() if p.parent == K8S / "base"}


def pom_kafka_version() -> str:
    pom = (render.DEPLOY / "local" / "kafka" / "pom.xml").read_text()
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert m
    return m.group(1)


# ------------------------------------------------------------------ kubernetes


def base_docs() -> list[dict[str, Any]]:
    out = []
    for name in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]:
        out += docs_of((K8S / "base" / name).read_text())
    return out


def test_kubernetes_objects_match_the_kubernetes_schemas() -> None:
    version = kubernetes_validate.latest_version()
    docs = base_docs()
    assert {d["kind"] for d in docs} == {
        "Deployment", "PodDisruptionBudget", "Service", "Job",
    }  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def known_settings() -> set[str]:
    classes: list[type[BaseSettings]] = [
        KafkaSettings, DatabaseSettings, GatewaySecrets, GatewayClientSettings,
        PaymentsSettings, InventorySettings, OrdersSettings, BridgeSettings,
        CaptureSettings, RefundsSettings, SharedSettings, RuntimeSettings, RelaySettings,
        GatewaySimSettings, MonitorSettings,
    ]  # fmt: skip
    out = set()
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name, field in cls.model_fields.items():
            alias = field.validation_alias
            out.add(alias.upper() if isinstance(alias, str) else f"{prefix}{name}".upper())
    assert "PAYSAGA_LOG_LEVEL" in inspect.getsource(configure_logging)  # read from environ
    return out | {"PAYSAGA_LOG_LEVEL"}


def test_a_deployment_per_service_with_probes_ports_settings_and_secrets() -> None:
    docs = base_docs()
    deployments = by_kind(docs, "Deployment")
    ports = {sp.name: sp.port for sp in devstack.SERVICE_PROCESSES}
    assert set(deployments) == {f"paysaga-{n}" for n in ports if n != "gatewaysim"}
    settings = known_settings() | set(k8s.SECURITY_SETTINGS)
    config = dict(
        lit.split("=", 1)
        for lit in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())[
            "configMapGenerator"
        ][0]["literals"]
    )
    assert set(config) <= settings
    assert set(k8s.SECURITY_SETTINGS) - set(config) == {
        "PAYSAGA_KAFKA_SASL_USERNAME",
        "PAYSAGA_KAFKA_SASL_PASSWORD",
    }
    for name, dep in deployments.items():
        service = name.removeprefix("paysaga-")
        if service == "monitor":  # one member of its group only: never two pods at once
            assert dep["spec"]["replicas"] == 1
            assert dep["spec"]["strategy"] == {"type": "Recreate"}
        else:
            assert dep["spec"]["replicas"] == 2, name
        [c] = dep["spec"]["template"]["spec"]["containers"]
        assert c["ports"] == [{"name": "http", "containerPort": ports[service]}]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["resources"]["requests"].keys() == {"cpu", "memory"}
        assert c["envFrom"] == [{"configMapRef": {"name": "paysaga-config"}}]
        env = {e["name"]: e for e in c["env"]}
        assert set(env) <= settings, set(env) - settings
        key = service.upper()
        assert env[f"PAYSAGA_{key}_PORT"]["value"] == str(ports[service])
        assert env[f"PAYSAGA_{key}_HOST"]["value"] == "0.0.0.0"
        assert env["PAYSAGA_KAFKA_SASL_USERNAME"]["value"] == name  # its KafkaUser
        secrets = {
            n: e["valueFrom"]["secretKeyRef"]["name"] for n, e in env.items() if "valueFrom" in e
        }
        assert secrets.pop("PAYSAGA_KAFKA_SASL_PASSWORD") == name
        if service in SERVICES:
            assert secrets.pop(f"PAYSAGA_{key}_DATABASE_URL") == f"{name}-database"
        if service in ("payments", "bridge"):
            assert secrets.pop("PAYSAGA_GATEWAY_SECRETS") == "paysaga-gateway"
        assert secrets == {}, name
        assert all("value" in e or "valueFrom" in e for e in env.values())
    assert set(by_kind(docs, "Service")) == {"paysaga-orders", "paysaga-bridge"}
    assert set(by_kind(docs, "PodDisruptionBudget")) == set(deployments)
    no_secret_objects = [d for d in docs if d["kind"] == "Secret"]
    assert no_secret_objects == []


def test_the_example_overlay_builds_on_base_and_the_strimzi_cluster() -> None:
    overlay = K8S / "overlays" / "example"
    k = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert {"../../base", "../../strimzi"} <= set(k["resources"])
    for entry in k["resources"] + [p["path"] for p in k.get("patches", [])]:
        assert (overlay / entry).exists(), entry
    assert [i["name"] for i in k["images"]] == ["paysaga"]
    for gen in k.get("configMapGenerator", []):
        assert gen["behavior"] == "merge"
        assert {lit.split("=", 1)[0] for lit in gen["literals"]} <= known_settings() | set(
            k8s.SECURITY_SETTINGS
        )


# ------------------------------------------------------------------ compose


def test_the_compose_file_runs_three_kraft_brokers_and_creates_every_topic() -> None:
    doc = yaml.safe_load((render.DEPLOY / "compose" / "compose.yaml").read_text())
    services = doc["services"]
    brokers = {n: s for n, s in services.items() if n.startswith("kafka-")}
    assert len(brokers) == 3
    for b in brokers.values():
        assert b["image"] == f"apache/kafka:{pom_kafka_version()}"
        assert b["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert b["environment"]["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
    script = services["topics"]["entrypoint"][-1]
    created = {}
    for line in script.strip().splitlines():
        m = re.search(r"--topic (\S+) --partitions (\d+) --replication-factor (\d+)(.*)", line)
        assert m, line
        configs = dict(c.split("=", 1) for c in re.findall(r"--config (\S+)", m.group(4)))
        created[m.group(1)] = (int(m.group(2)), int(m.group(3)), configs)
    assert set(created) == set(TOPICS)
    for name, (partitions, rf, configs) in created.items():
        assert partitions == TOPICS[name].get("partitions", DEFAULTS["partitions"])
        assert rf == 3
        assert configs == expected_configs(name)
    for sp in devstack.SERVICE_PROCESSES:
        assert services[sp.name]["command"] == ["python", "-m", sp.module]
        assert services[sp.name]["environment"][f"PAYSAGA_{sp.name.upper()}_PORT"] == str(sp.port)
    assert {"postgres", "prometheus", "grafana", "migrate"} <= set(services)
