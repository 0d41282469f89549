"""``--format strimzi``: a Strimzi (``kafka.strimzi.io/v1``) KRaft cluster, its topics
and its users (``deploy/k8s/strimzi/``)."""

from __future__ import annotations

from pathlib import Path

from services.runtime.render.model import (
    CLUSTER,
    KAFKA_METADATA_VERSION,
    KAFKA_VERSION,
    MIN_INSYNC_REPLICAS,
    REPLICAS,
    accesses,
    cluster_specs,
    dump,
    header,
)
from services.runtime.topics import TOPICS_FILE


def render(path: Path = TOPICS_FILE) -> str:
    """A Strimzi (1.0, ``kafka.strimzi.io/v1``) KRaft cluster, its topics and users."""
    labels = {"strimzi.io/cluster": CLUSTER}
    pool = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaNodePool",
        "metadata": {"name": "dual-role", "labels": labels},
        "spec": {
            "replicas": REPLICAS,
            "roles": ["controller", "broker"],
            "storage": {
                "type": "jbod",
                "volumes": [
                    {
                        "id": 0,
                        "type": "persistent-claim",
                        "size": "100Gi",
                        "deleteClaim": False,
                        "kraftMetadata": "shared",
                    }
                ],
            },
            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}},
        },
    }
    kafka = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "Kafka",
        "metadata": {"name": CLUSTER},
        "spec": {
            "kafka": {
                "version": KAFKA_VERSION,
                "metadataVersion": KAFKA_METADATA_VERSION,
                "listeners": [
                    {
                        "name": "tls",
                        "port": 9093,
                        "type": "internal",
                        "tls": True,
                        "authentication": {"type": "scram-sha-512"},
                    }
                ],
                "authorization": {"type": "simple"},
                "config": {
                    "default.replication.factor": REPLICAS,
                    "min.insync.replicas": MIN_INSYNC_REPLICAS,
                    "offsets.topic.replication.factor": REPLICAS,
                    "transaction.state.log.replication.factor": REPLICAS,
                    "transaction.state.log.min.isr": MIN_INSYNC_REPLICAS,
                    "auto.create.topics.enable": False,
                },
            },
            "entityOperator": {"topicOperator": {}, "userOperator": {}},
        },
    }
    topics = [
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {"name": s.name, "labels": labels},
            "spec": {
                "topicName": s.name,
                "partitions": s.partitions,
                "replicas": s.replication_factor,
                "config": dict(s.configs),
            },
        }
        for s in cluster_specs(path)
    ]
    users = [
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaUser",
            "metadata": {"name": a.user, "labels": labels},
            "spec": {
                "authentication": {"type": "scram-sha-512"},
                "authorization": {
                    "type": "simple",
                    "acls": [
                        {
                            "resource": {"type": rtype, "patternType": "literal"}
                            if rtype == "cluster"
                            else {"type": rtype, "name": name, "patternType": "literal"},
                            "operations": list(ops),
                            "host": "*",
                        }
                        for rtype, name, ops in a.acls()
                    ],
                },
            },
        }
        for a in accesses(path)
    ]
    return header() + dump(pool, kafka, *topics, *users)


def kustomization() -> str:
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["kafka.yaml"],
    }
    return header() + dump(doc)
