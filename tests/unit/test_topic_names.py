"""The topic names the services use in code are topics.yaml's."""

from __future__ import annotations

from services.runtime import topics


def test_every_topic_named_in_code_is_declared_in_topics_yaml() -> None:
    named = {v for k, v in vars(topics).items() if k.endswith("_TOPIC")}
    declared = {spec.name for spec in topics.load_specs()}
    assert len(named) == 13
    assert named - declared == set()
