"""The foundation every service stands on: the real broker, topics from topics.yaml, and
each service's migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from services.runtime import migrate, topics
from services.runtime.settings import SERVICES
from tests.conftest import Infra
from tests.support.harness import uid

pytestmark = pytest.mark.integration


def test_round_trip_through_the_broker_with_an_idempotent_producer(infra: Infra) -> None:
    topic = f"test.roundtrip.{uid()}"

    async def run() -> list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        await _create(infra.bootstrap, topic)
        producer = AIOKafkaProducer(
            bootstrap_servers=infra.bootstrap, enable_idempotence=True, acks="all"
        )
        await producer.start()
        try:
            for i in range(5):
                meta = await producer.send_and_wait(
                    topic, f"v{i}".encode(), key=b"order-1", headers=[("h", str(i).encode())]
                )
                assert meta.offset == i  # acknowledged by the broker, in order
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=infra.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            out = []
            while len(out) < 5:
                for msgs in (await consumer.getmany(timeout_ms=5000)).values():
                    out += [(m.key, m.value, list(m.headers)) for m in msgs]
            return out
        finally:
            await consumer.stop()

    got = asyncio.run(run())
    assert got == [(b"order-1", f"v{i}".encode(), [("h", str(i).encode())]) for i in range(5)]


async def _create(bootstrap: str, name: str) -> None:
    spec = topics.TopicSpec(name, 1, 1, {"min.insync.replicas": "1"})
    await topics.apply(bootstrap, [spec])


def test_topics_apply_twice_is_a_no_op_and_reports_drift(infra: Infra, tmp_path: Path) -> None:
    name = f"test.apply.{uid()}"
    yaml_file = tmp_path / "topics.yaml"
    yaml_file.write_text(
        "defaults: {partitions: 2, replication_factor: 1, min_insync_replicas: 1, "
        "retention_ms: 3600000}\n"
        f"topics:\n  {name}:\n    cleanup_policy: compact\n"
    )
    specs = topics.load_specs(yaml_file)
    first = asyncio.run(topics.apply(infra.bootstrap, specs))
    assert first.created == [name]
    second = asyncio.run(topics.apply(infra.bootstrap, specs))
    assert not second.changed
    assert second.drift == []
    raised = asyncio.run(topics.apply(infra.bootstrap, topics.load_specs(yaml_file, partitions=3)))
    assert raised.partitions_raised == [name]
    shrink = asyncio.run(topics.apply(infra.bootstrap, topics.load_specs(yaml_file, partitions=1)))
    assert not shrink.changed
    assert shrink.drift == [
        f"{name}: has 3 partitions, topics.yaml asks 1 "
        "(partitions cannot shrink; change topics.yaml or recreate the topic)"
    ]


def test_the_project_topics_match_topics_yaml(infra: Infra) -> None:
    """make test applied topics.yaml before the suite: applying again changes nothing."""
    report = asyncio.run(topics.apply(infra.bootstrap, topics.load_specs()))
    assert not report.changed
    assert report.drift == []


@pytest.mark.parametrize("service", SERVICES)
def test_migrations_run_up_from_an_empty_database(infra: Infra, service: str) -> None:
    dbname = f"paysaga_migrate_{service}_{uid('')}"
    with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    try:
        url = infra.db_url(dbname)
        migrate.upgrade(service, url)
        migrate.upgrade(service, url)  # at head: nothing to do
        engine = create_engine(url)
        tables = set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            # the frozen migrations produce exactly the models: a model changed without
            # a migration (or a migration without its model change) fails here
            drift = compare_metadata(
                MigrationContext.configure(conn), migrate.target_metadata(service)
            )
        engine.dispose()
        assert drift == []
        assert {"inbox", "outbox", "consumer_positions", "dead_letters", "parked"} <= tables
        assert "alembic_version" in tables
        assert len(tables) > 6  # the service's own tables too
    finally:
        with psycopg.connect(infra.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{dbname}" WITH (FORCE)')
