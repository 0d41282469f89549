"""The AsyncAPI 3.0 document of every topic, `schemas/asyncapi.yaml`.

Built from `topics.yaml` (channels: address, partitions, configs; each topic's key;
its producer and consumers as `send`/`receive` operations) and the pydantic models
(message payloads as JSON Schema, every definition under `components.schemas`).
`make schemas` writes it; a test fails when the committed file differs from `render()`.

A topic's record key is each message's Kafka binding key (`bindings.kafka.key`, a
string schema whose description is topics.yaml's `key`). A receiving paysaga service
names its consumer group (`bindings.kafka.groupId`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.contract import GatewayWebhook
from schemas.envelope import Envelope
from schemas.events import EVENT_TYPES
from services.runtime.topics import TOPICS_FILE, load_specs

__all__ = ["ASYNCAPI_FILE", "build", "render"]

ASYNCAPI_FILE = Path(__file__).resolve().parent / "asyncapi.yaml"
KAFKA_BINDING = "0.5.0"

#: topics.yaml `events` entries (before any "(...)") that are not enveloped event types
_RAW_MESSAGES = {
    "gateway webhook body": "GatewayWebhook",
    "any": "DeadLetter",
    "the monitor's saga table rows": "MonitorTableRow",
}

_GATEWAY_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": ["paysaga-gateway", "paysaga-signature"],
    "properties": {
        "paysaga-gateway": {"type": "string", "description": "The gateway's id, e.g. simgw"},
        "paysaga-signature": {
            "type": "string",
            "description": 't=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>;'
            " more than one v1= while secrets rotate",
        },
    },
}

_DLQ_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "A dead letter names where it was read and why it failed. Replay and "
    "release records that `paysaga dlq` writes carry the paysaga-target-group, "
    "paysaga-dead-letter and paysaga-replay-of or paysaga-control headers instead.",
    "properties": {
        "paysaga-dlq-original-topic": {"type": "string"},
        "paysaga-dlq-original-partition": {"type": "string", "description": "decimal"},
        "paysaga-dlq-original-offset": {"type": "string", "description": "decimal"},
        "paysaga-dlq-original-timestamp": {"type": "string", "description": "unix ms"},
        "paysaga-dlq-consumer-group": {"type": "string", "description": "the failing group"},
        "paysaga-dlq-error-class": {"type": "string"},
        "paysaga-dlq-error-message": {"type": "string", "description": "card data redacted"},
        "paysaga-dlq-attempts": {"type": "string", "description": "decimal"},
        "paysaga-dlq-first-failure-at": {"type": "string"},
        "paysaga-dlq-redacted": {"type": "string", "description": "kinds of card data masked"},
        "paysaga-target-group": {"type": "string", "description": "replay/release: the group"},
        "paysaga-dead-letter": {"type": "string", "description": "JSON [topic, partition, offset]"},
        "paysaga-replay-of": {"type": "string", "description": "replay: the dead letter"},
        "paysaga-control": {"type": "string", "enum": ["release"]},
    },
}


def _schemas() -> dict[str, Any]:
    """Every model's JSON Schema, refs pointing into `components.schemas`."""
    models: list[type[BaseModel]] = [Envelope, GatewayWebhook, *EVENT_TYPES.values()]
    _, top = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    defs: dict[str, Any] = top["$defs"]
    return dict(sorted(defs.items()))


def _first_line(model: type[BaseModel]) -> str:
    return (model.__doc__ or model.__name__).strip().splitlines()[0]


def _message(name: str, key: str) -> dict[str, Any]:
    binding = {
        "kafka": {
            "key": {"type": "string", "description": f"{key} (UTF-8)"},
            "bindingVersion": KAFKA_BINDING,
        }
    }
    base = {"name": name, "contentType": "application/json", "bindings": binding}
    if name == "GatewayWebhook":
        return {
            **base,
            "title": "Gateway webhook",
            "summary": "The webhook body exactly as the gateway sent it (the signed bytes)",
            "headers": _GATEWAY_HEADERS,
            "payload": {"$ref": "#/components/schemas/GatewayWebhook"},
        }
    if name == "MonitorTableRow":
        return {
            **base,
            "title": "Monitor table row",
            "summary": "The monitor's own saga table (faust changelog): status, since, reported;"
            " internal to the monitor, read by nothing else",
            "payload": {"type": "object"},
        }
    if name == "DeadLetter":
        return {
            **base,
            "title": "Dead letter",
            "summary": "The failed record's original key and value (card data redacted)",
            "headers": _DLQ_HEADERS,
            "payload": {},
        }
    model = EVENT_TYPES[name]
    return {
        **base,
        "title": name,
        "summary": _first_line(model),
        "payload": {
            "allOf": [
                {"$ref": "#/components/schemas/Envelope"},
                {
                    "type": "object",
                    "properties": {
                        "event_type": {"const": name},
                        "payload": {"$ref": f"#/components/schemas/{name}"},
                    },
                },
            ]
        },
    }


def _message_names(topic: str, events: list[str]) -> list[str]:
    names = []
    for event in events:
        name = event if event in EVENT_TYPES else _RAW_MESSAGES.get(event.split(" (")[0])
        if name is None:
            raise ValueError(f"topics.yaml {topic}: event {event!r} has no model")
        names.append(name)
    return names


def _parties(value: str | list[str]) -> list[str]:
    return [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)


def _slug(party: str) -> str:
    """`checkout (upstream)` -> `checkout`, `paysaga stock set` -> `paysaga_stock_set`."""
    return re.sub(r"[^a-z0-9]+", "_", party.split("(")[0].strip().lower()).strip("_")


def _topic_configuration(configs: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in sorted(configs.items()):
        if name == "cleanup.policy":
            out[name] = value.split(",")
        else:
            out[name] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return out


def build(topics_file: Path = TOPICS_FILE) -> dict[str, Any]:
    """The AsyncAPI document as a dict (deterministic: topics.yaml order, sorted schemas)."""
    doc: dict[str, Any] = yaml.safe_load(topics_file.read_text(encoding="utf-8"))
    specs = {s.name: s for s in load_specs(topics_file)}
    groups = {name.removesuffix(".dlq") for name in specs if name.endswith(".dlq")}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for topic, t in doc["topics"].items():
        spec = specs[topic]
        names = _message_names(topic, t["events"])
        for name in names:
            if keys.setdefault(name, spec.key) != spec.key:
                raise ValueError(f"{name}: keyed by {keys[name]!r} and {spec.key!r}")
            messages[name] = _message(name, spec.key)
        channels[topic] = {
            "address": topic,
            "title": topic,
            "description": f"Key: {spec.key}.",
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in names},
            "bindings": {
                "kafka": {
                    "partitions": spec.partitions,
                    "replicas": spec.replication_factor,
                    "topicConfiguration": _topic_configuration(spec.configs),
                    "bindingVersion": KAFKA_BINDING,
                }
            },
        }
        refs = [{"$ref": f"#/channels/{topic}/messages/{n}"} for n in names]
        for action, parties in (("send", t["producer"]), ("receive", t["consumers"])):
            for party in _parties(parties):
                operation: dict[str, Any] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{topic}"},
                    "title": f"{party} {action}s {topic}",
                    "tags": [{"name": party}],
                    "messages": refs,
                }
                group = f"paysaga.{_slug(party)}"
                if action == "receive" and group in groups:
                    operation["bindings"] = {
                        "kafka": {
                            "groupId": {"type": "string", "enum": [group]},
                            "bindingVersion": KAFKA_BINDING,
                        }
                    }
                operations[f"{_slug(party)}.{action}.{topic}"] = operation
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "paysaga",
            "version": "1.0.0",
            "description": "Every Kafka topic of paysaga: generated from topics.yaml and the "
            "pydantic models in schemas/ by `make schemas` (do not edit by hand). The "
            "external contract is docs/contract.md.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": dict(sorted(messages.items())), "schemas": _schemas()},
    }


def render(topics_file: Path = TOPICS_FILE) -> str:
    """The document as YAML text, exactly what `schemas/asyncapi.yaml` holds."""
    header = "# Generated by `make schemas` from topics.yaml and schemas/*.py: do not edit.\n"
    body = yaml.safe_dump(build(topics_file), sort_keys=False, allow_unicode=True, width=100)
    return header + body
