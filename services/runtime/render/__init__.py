"""Deployment manifests from ``topics.yaml``: the topology is written once.

``paysaga topics render --format strimzi|compose|acl`` prints one of them;
``paysaga topics render --write`` regenerates every committed file under ``deploy/``
(a unit test fails while a committed file differs from a fresh render).

One module per output, over one shared model:

- ``model.py``    who reads and writes which topic, each principal's access, the cluster
- ``strimzi.py``  Strimzi's Kafka, KafkaTopics and KafkaUsers (``deploy/k8s/strimzi/``)
- ``k8s.py``      the kustomize base of the services (``deploy/k8s/base/``)
- ``compose.py``  the compose file and what it mounts (``deploy/compose/``)
- ``acl.py``      ``kafka-acls.sh`` commands (``deploy/kafka-acls.sh``)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.runtime.render import acl, compose, k8s, strimzi

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"

FORMATS: dict[str, Callable[[], str]] = {
    "strimzi": strimzi.render,
    "compose": compose.render,
    "acl": acl.render,
}


def deploy_files() -> dict[Path, str]:
    """Every generated file under deploy/, path → text."""
    files = {
        DEPLOY / "k8s" / "strimzi" / "kafka.yaml": strimzi.render(),
        DEPLOY / "k8s" / "strimzi" / "kustomization.yaml": strimzi.kustomization(),
        DEPLOY / "kafka-acls.sh": acl.render(),
        DEPLOY / "compose" / "compose.yaml": compose.render(),
        DEPLOY / "compose" / "prometheus.yml": compose.prometheus_config(),
        DEPLOY / "compose" / "grafana-datasources.yml": compose.grafana_datasources(),
        DEPLOY / "compose" / "postgres-init.sql": compose.postgres_init(),
    }
    files.update({DEPLOY / "k8s" / "base" / n: t for n, t in k8s.render().items()})
    return files


def write(files: dict[Path, str]) -> list[Path]:
    """Write the files that differ; returns them."""
    changed = []
    for path, text in sorted(files.items()):
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed
