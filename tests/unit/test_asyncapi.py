"""schemas/asyncapi.yaml: no drift, valid AsyncAPI 3.0, true to topics.yaml and the models."""

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from schemas import EVENT_TYPES, asyncapi, generate
from services.runtime import dlq
from services.runtime.topics import TOPICS_FILE

DATA = Path(__file__).resolve().parents[1] / "data"
EXAMPLES = Path(generate.__file__).resolve().parent / "examples"
# the official AsyncAPI 3.0.0 JSON Schema (asyncapi/spec-json-schemas; see tests/data/README.md)
SPEC = json.loads((DATA / "asyncapi-3.0.0.json").read_text(encoding="utf-8"))


def spec_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SPEC)
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def committed() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(asyncapi.ASYNCAPI_FILE.read_text(encoding="utf-8"))
    return doc


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def validate_message(doc: dict[str, Any], message: str, instance: Any) -> None:
    """Validate `instance` against a message's payload, its refs resolved in `doc`."""
    schema = {**doc, "$ref": f"#/components/messages/{message}/payload"}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_committed_document_has_no_drift() -> None:
    assert asyncapi.ASYNCAPI_FILE.read_text(encoding="utf-8") == asyncapi.render(), (
        "schemas/asyncapi.yaml is stale: run `make schemas`"
    )
    assert generate.main(["--check"]) == 0


def test_drift_check_reports_a_changed_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "asyncapi.yaml"
    stale.write_text(asyncapi.render().replace("capture.events.v1", "capture.v0"), "utf-8")
    monkeypatch.setattr(asyncapi, "ASYNCAPI_FILE", stale)
    assert generate.main(["--check"]) == 1
    assert f"drifted: {stale}" in capsys.readouterr().err


def test_document_is_valid_asyncapi_3() -> None:
    assert spec_errors(committed()) == []


@pytest.mark.parametrize(
    ("what", "break_it"),
    [
        ("no info", lambda d: d.pop("info")),
        (
            "AsyncAPI 2 action",
            lambda d: d["operations"]["bridge.send.gateway.confirmations.v1"].update(
                action="publish"
            ),
        ),
        (
            "partitions not an integer",
            lambda d: d["channels"]["orders.status.v1"]["bindings"]["kafka"].update(
                partitions="six"
            ),
        ),
        (
            "unknown message field",
            lambda d: d["components"]["messages"]["OrderPlaced"].update(key="order_id"),
        ),
        (
            "headers not a schema",
            lambda d: d["components"]["messages"]["GatewayWebhook"].update(
                headers=["paysaga-signature"]
            ),
        ),
    ],
)
def test_validator_rejects_a_broken_document(what: str, break_it: Any) -> None:
    doc = copy.deepcopy(committed())
    break_it(doc)
    assert spec_errors(doc), what


def test_every_reference_resolves() -> None:
    doc = committed()
    for ref in refs(doc):
        resolve(doc, ref)


def test_every_topic_with_its_key_messages_producer_and_consumers() -> None:
    doc = committed()
    topics: dict[str, Any] = yaml.safe_load(TOPICS_FILE.read_text(encoding="utf-8"))["topics"]
    assert set(doc["channels"]) == set(topics)
    for topic, t in topics.items():
        channel = doc["channels"][topic]
        assert channel["address"] == topic
        for name in channel["messages"]:
            key = doc["components"]["messages"][name]["bindings"]["kafka"]["key"]
            assert key["description"].startswith(t["key"]), (topic, name)
        enveloped = [e for e in t["events"] if e in EVENT_TYPES]
        assert set(enveloped) <= set(channel["messages"]), topic
        ops = [
            o for o in doc["operations"].values() if o["channel"]["$ref"] == f"#/channels/{topic}"
        ]
        sends = {o["tags"][0]["name"] for o in ops if o["action"] == "send"}
        receives = {o["tags"][0]["name"] for o in ops if o["action"] == "receive"}
        producers = t["producer"].split(", ")
        assert (sends, receives) == (set(producers), set(t["consumers"])), topic
    payments = doc["operations"]["payments.receive.checkout.orders.v1"]
    assert payments["bindings"]["kafka"]["groupId"]["enum"] == ["paysaga.payments"]


def test_gateway_confirmations_carry_the_raw_webhook_and_its_headers() -> None:
    doc = committed()
    assert list(doc["channels"]["gateway.confirmations.v1"]["messages"]) == ["GatewayWebhook"]
    message = doc["components"]["messages"]["GatewayWebhook"]
    assert message["headers"]["required"] == ["paysaga-gateway", "paysaga-signature"]
    for path in sorted(EXAMPLES.glob("gateway-webhook-*.json")):
        validate_message(doc, "GatewayWebhook", json.loads(path.read_bytes()))


def test_dead_letter_headers_are_the_ones_the_runtime_writes() -> None:
    message = committed()["components"]["messages"]["DeadLetter"]
    written = {
        dlq.H_TOPIC, dlq.H_PARTITION, dlq.H_OFFSET, dlq.H_TIMESTAMP, dlq.H_GROUP,
        dlq.H_ERROR_CLASS, dlq.H_ERROR_MESSAGE, dlq.H_ATTEMPTS, dlq.H_FIRST_FAILURE,
        dlq.H_REDACTED, dlq.H_TARGET_GROUP, dlq.H_REPLAY_OF, dlq.H_CONTROL, dlq.H_DEAD_LETTER,
    }  # fmt: skip
    assert set(message["headers"]["properties"]) == written


@pytest.mark.parametrize(
    "path",
    sorted(p for p in EXAMPLES.glob("*.json") if not p.name.startswith("gateway-")),
    ids=lambda p: p.stem,
)
def test_examples_validate_against_their_message_payload(path: Path) -> None:
    doc = committed()
    record = json.loads(path.read_bytes())
    validate_message(doc, path.stem, record)
    other = "StockLevelSet" if path.stem != "StockLevelSet" else "OrderPlaced"
    with pytest.raises(jsonschema.ValidationError):
        validate_message(doc, other, record)
    broken = {**record, "payload": {**record["payload"], "unknown_field": 1}}
    with pytest.raises(jsonschema.ValidationError):
        validate_message(doc, path.stem, broken)
