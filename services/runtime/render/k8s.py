"""``deploy/k8s/base``: a kustomize base with a Deployment (and a PodDisruptionBudget)
per process, a Service for each HTTP API others call, the migration Job and the
settings every process shares, over the Strimzi cluster's SASL_SSL listener."""

from __future__ import annotations

from typing import Any

from services.devstack.profiles import SERVICE_PROCESSES
from services.runtime.render.model import (
    CLUSTER,
    EXPOSED,
    MONITOR,
    REPLICAS,
    dump,
    header,
    user_of,
)
from services.runtime.settings import SERVICES

#: settings of the secure Kafka client (SASL_SSL + SCRAM-SHA-512)
SECURITY_SETTINGS = (
    "PAYSAGA_KAFKA_SECURITY_PROTOCOL",
    "PAYSAGA_KAFKA_SASL_MECHANISM",
    "PAYSAGA_KAFKA_SASL_USERNAME",
    "PAYSAGA_KAFKA_SASL_PASSWORD",
    "PAYSAGA_KAFKA_SSL_CAFILE",
)
#: the processes of a deployment (the gateway simulator is for development only)
DEPLOYED = tuple(sp for sp in SERVICE_PROCESSES if sp.name != "gatewaysim")
#: who verifies webhook signatures (PAYSAGA_GATEWAY_SECRETS)
NEEDS_GATEWAY_SECRETS = ("bridge", "payments")
CA_DIR = "/etc/paysaga/kafka-ca"

CONFIG = {
    "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": f"{CLUSTER}-kafka-bootstrap:9093",
    "PAYSAGA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "PAYSAGA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "PAYSAGA_KAFKA_SSL_CAFILE": f"{CA_DIR}/ca.crt",
    "PAYSAGA_KAFKA_REPLICATION_FACTOR": str(REPLICAS),
    "PAYSAGA_GATEWAY_URL": "https://gateway.example.com",
    "PAYSAGA_LOG_LEVEL": "INFO",
}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _deployment(name: str, module: str, port: int) -> dict[str, Any]:
    key = name.upper()
    labels = {"app.kubernetes.io/name": f"paysaga-{name}", "app.kubernetes.io/part-of": "paysaga"}
    env: list[dict[str, Any]] = [
        {"name": f"PAYSAGA_{key}_HOST", "value": "0.0.0.0"},
        {"name": f"PAYSAGA_{key}_PORT", "value": str(port)},
        {"name": "PAYSAGA_KAFKA_SASL_USERNAME", "value": user_of(name)},
        # the Secret the Strimzi User Operator creates for KafkaUser paysaga-<name>
        _secret_env("PAYSAGA_KAFKA_SASL_PASSWORD", user_of(name), "password"),
    ]
    if name in SERVICES:
        env.append(_secret_env(f"PAYSAGA_{key}_DATABASE_URL", f"paysaga-{name}-database", "url"))
    if name in NEEDS_GATEWAY_SECRETS:
        env.append(_secret_env("PAYSAGA_GATEWAY_SECRETS", "paysaga-gateway", "secrets"))
    if name == "orders":  # its periodic reconcile reads every store: it holds only its own
        env.append({"name": "PAYSAGA_RECONCILE_INTERVAL_S", "value": "0"})
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10}
    container = {
        "name": name,
        "image": "paysaga",
        "command": ["python", "-m", module],
        "ports": [{"name": "http", "containerPort": port}],
        "envFrom": [{"configMapRef": {"name": "paysaga-config"}}],
        "env": env,
        "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 6},
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
        "volumeMounts": [{"name": "kafka-ca", "mountPath": CA_DIR, "readOnly": True}],
    }
    # two members of every process, except the monitor: it assumes it is the only member
    # of its group (its in-memory table keeps the rows of a partition revoked from it, so
    # two members could both report a stalled order and double paysaga_sagas_stalled).
    # One replica, replaced by stopping the old pod first (Recreate): never two at once.
    replicas = (
        {"replicas": 1, "strategy": {"type": "Recreate"}} if name == MONITOR else {"replicas": 2}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"paysaga-{name}", "labels": labels},
        "spec": {
            **replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": f"paysaga-{name}"}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    # a stopping service finishes its batch (PAYSAGA_HANDLER_TIMEOUT_S)
                    "terminationGracePeriodSeconds": 45,
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "kafka-ca",
                            # the cluster CA of the Strimzi cluster (key ca.crt)
                            "secret": {"secretName": f"{CLUSTER}-cluster-ca-cert"},
                        }
                    ],
                },
            },
        },
    }


def _pdb(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"paysaga-{name}"},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": f"paysaga-{name}"}},
        },
    }


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"paysaga-{name}"},
        "spec": {
            "selector": {"app.kubernetes.io/name": f"paysaga-{name}"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def _migrate_job() -> dict[str, Any]:
    env = [
        _secret_env(f"PAYSAGA_{s.upper()}_DATABASE_URL", f"paysaga-{s}-database", "url")
        for s in SERVICES
    ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "paysaga-migrate"},
        "spec": {
            "backoffLimit": 6,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": "migrate",
                            "image": "paysaga",
                            "command": ["paysaga", "migrate"],
                            "env": env,
                            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "runAsNonRoot": True,
                            },
                        }
                    ],
                }
            },
        },
    }


def render() -> dict[str, str]:
    """deploy/k8s/base: file name → text."""
    files: dict[str, str] = {}
    for sp in DEPLOYED:
        docs = [_deployment(sp.name, sp.module, sp.port), _pdb(sp.name)]
        if sp.name in EXPOSED:
            docs.append(_service(sp.name))
        files[f"{sp.name}.yaml"] = header() + dump(*docs)
    files["migrate-job.yaml"] = header() + dump(_migrate_job())
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "paysaga"}}],
        "resources": sorted(files),
        "configMapGenerator": [
            {"name": "paysaga-config", "literals": [f"{k}={v}" for k, v in CONFIG.items()]}
        ],
    }
    files["kustomization.yaml"] = header() + dump(kustomization)
    return files
