"""``--format compose``: a compose file for a team's own machines, and the files it
mounts (``deploy/compose/``: Prometheus, Grafana, the databases)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from services.devstack.profiles import SERVICE_PROCESSES
from services.runtime.render.model import (
    EXPOSED,
    GENERATED,
    KAFKA_VERSION,
    MIN_INSYNC_REPLICAS,
    REPLICAS,
    cluster_specs,
    dump,
    header,
)
from services.runtime.settings import LOCAL_DEV_GATEWAY_SECRETS, SERVICES
from services.runtime.topics import TOPICS_FILE

COMPOSE_CLUSTER_ID = "cGF5c2FnYS1jb21wb3NlMQ"  # any 16 bytes, base64url: one cluster
COMPOSE_DB = "postgresql+psycopg://paysaga:paysaga@postgres:5432"
PAYSAGA_IMAGE = "paysaga:dev"


def _broker(n: int) -> dict[str, Any]:
    voters = ",".join(f"{i}@kafka-{i}:9093" for i in range(1, REPLICAS + 1))
    return {
        "image": f"apache/kafka:{KAFKA_VERSION}",
        "hostname": f"kafka-{n}",
        "ports": [f"127.0.0.1:{29091 + n}:29092"],
        "environment": {
            "KAFKA_NODE_ID": str(n),
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "CLUSTER_ID": COMPOSE_CLUSTER_ID,
            "KAFKA_CONTROLLER_QUORUM_VOTERS": voters,
            "KAFKA_LISTENERS": "INTERNAL://:19092,CONTROLLER://:9093,EXTERNAL://:29092",
            "KAFKA_ADVERTISED_LISTENERS": (
                f"INTERNAL://kafka-{n}:19092,EXTERNAL://127.0.0.1:{29091 + n}"
            ),
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": (
                "INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT,EXTERNAL:PLAINTEXT"
            ),
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_INTER_BROKER_LISTENER_NAME": "INTERNAL",
            "KAFKA_DEFAULT_REPLICATION_FACTOR": str(REPLICAS),
            "KAFKA_MIN_INSYNC_REPLICAS": str(MIN_INSYNC_REPLICAS),
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": str(REPLICAS),
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": str(REPLICAS),
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": str(MIN_INSYNC_REPLICAS),
            "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        },
        "healthcheck": {
            "test": [
                "CMD-SHELL",
                "/opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server"
                " localhost:19092 >/dev/null 2>&1",
            ],
            "interval": "5s",
            "timeout": "10s",
            "retries": 30,
        },
    }


def topic_commands(path: Path = TOPICS_FILE, bootstrap: str = "kafka-1:19092") -> list[str]:
    """``kafka-topics.sh`` commands creating topics.yaml's topics on a 3-broker cluster."""
    out = []
    for s in cluster_specs(path):
        configs = " ".join(f"--config {shlex.quote(f'{k}={v}')}" for k, v in s.configs.items())
        out.append(
            f"/opt/kafka/bin/kafka-topics.sh --bootstrap-server {bootstrap} --create"
            f" --if-not-exists --topic {s.name} --partitions {s.partitions}"
            f" --replication-factor {s.replication_factor} {configs}"
        )
    return out


def _http_check(port: int) -> dict[str, Any]:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/healthz')"
    return {"test": ["CMD", "python", "-c", probe], "interval": "5s", "retries": 30}


def render(path: Path = TOPICS_FILE) -> str:
    """A compose file: 3 KRaft brokers, the topics, PostgreSQL, every service (and the
    gateway simulator), Prometheus and Grafana. Plaintext Kafka: a team's own machines."""
    brokers = {f"kafka-{n}": _broker(n) for n in range(1, REPLICAS + 1)}
    healthy = {b: {"condition": "service_healthy"} for b in brokers}
    done = {"condition": "service_completed_successfully"}
    base_env = {
        "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": ",".join(f"{b}:19092" for b in brokers),
        "PAYSAGA_KAFKA_REPLICATION_FACTOR": str(REPLICAS),
        "PAYSAGA_DATABASE_URL": COMPOSE_DB,
        "PAYSAGA_GATEWAY_URL": "http://gatewaysim:8090",
        "PAYSAGA_BRIDGE_URL": "http://bridge:8070",
        "PAYSAGA_GATEWAY_SECRETS": LOCAL_DEV_GATEWAY_SECRETS,
    }
    image = {
        "image": PAYSAGA_IMAGE,
        "build": {"context": "../..", "dockerfile": "deploy/Dockerfile"},
    }
    services: dict[str, Any] = {
        **brokers,
        "topics": {
            "image": f"apache/kafka:{KAFKA_VERSION}",
            "depends_on": healthy,
            "entrypoint": ["/bin/sh", "-ec", "\n".join(topic_commands(path)) + "\n"],
            "restart": "no",
        },
        "postgres": {
            "image": "postgres:17",
            "environment": {"POSTGRES_USER": "paysaga", "POSTGRES_PASSWORD": "paysaga"},
            "volumes": [
                "pgdata:/var/lib/postgresql/data",
                "./postgres-init.sql:/docker-entrypoint-initdb.d/paysaga.sql:ro",
            ],
            "healthcheck": {
                "test": ["CMD-SHELL", "pg_isready -U paysaga"],
                "interval": "5s",
                "retries": 30,
            },
        },
        "migrate": {
            **image,
            "command": ["paysaga", "migrate"],
            "environment": dict(base_env),
            "depends_on": {"postgres": {"condition": "service_healthy"}},
            "restart": "no",
        },
    }
    for sp in SERVICE_PROCESSES:
        key = sp.name.upper()
        env = {
            **base_env,
            f"PAYSAGA_{key}_HOST": "0.0.0.0",
            f"PAYSAGA_{key}_PORT": str(sp.port),
        }
        entry: dict[str, Any] = {
            **image,
            "command": ["python", "-m", sp.module],
            "environment": env,
            "depends_on": {"topics": dict(done), "migrate": dict(done)},
            "healthcheck": _http_check(sp.port),
            "restart": "unless-stopped",
        }
        if sp.name in (*EXPOSED, "gatewaysim"):
            entry["ports"] = [f"127.0.0.1:{sp.port}:{sp.port}"]
        services[sp.name] = entry
    services["prometheus"] = {
        "image": "prom/prometheus:v3.5.0",
        "volumes": ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"],
        "ports": ["127.0.0.1:9090:9090"],
    }
    services["grafana"] = {
        "image": "grafana/grafana:12.1.0",
        "volumes": [
            "./grafana-datasources.yml:/etc/grafana/provisioning/datasources/paysaga.yml:ro"
        ],
        "ports": ["127.0.0.1:3000:3000"],
        "depends_on": ["prometheus"],
    }
    doc = {"name": "paysaga", "services": services, "volumes": {"pgdata": {}}}
    return header() + dump(doc)


def prometheus_config() -> str:
    jobs = [
        {
            "job_name": sp.name,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"{sp.name}:{sp.port}"]}],
        }
        for sp in SERVICE_PROCESSES
    ]
    return header() + dump({"global": {"scrape_interval": "15s"}, "scrape_configs": jobs})


def grafana_datasources() -> str:
    source: dict[str, Any] = {"name": "Prometheus", "type": "prometheus", "access": "proxy"}
    source |= {"url": "http://prometheus:9090", "isDefault": True}
    return header() + dump({"apiVersion": 1, "datasources": [source]})


def postgres_init() -> str:
    lines = [f"-- {GENERATED}"]
    lines += [f"CREATE DATABASE paysaga_{s};" for s in SERVICES]
    return "\n".join(lines) + "\n"
