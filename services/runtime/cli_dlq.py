"""``paysaga dlq list|show|replay|purge`` — dead letters for SREs.

Dead letters are read straight from the ``*.dlq`` topics (no consumer group, so
inspecting commits nothing). ``replay`` re-publishes originals to the failing group's
dead-letter topic, its control channel (never to the original topic, which others
read); the consumer's inbox makes a repeated replay harmless. ``purge`` drops a dead
letter: it releases the order's blocked records without applying it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import UTC, datetime
from typing import Literal

import typer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.table import Table

from services.runtime import dlq
from services.runtime.kafka import client_options
from services.runtime.messages import Record
from services.runtime.settings import KafkaSettings
from services.runtime.terminal import make_console
from services.runtime.topics import partitions_of

app = typer.Typer(no_args_is_help=True, help="Inspect, replay and purge dead letters")
console = make_console()
Action = Literal["replay", "purge"]


@dataclasses.dataclass(frozen=True)
class Filters:
    topic: str | None = None
    group: str | None = None
    error_class: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    ref: str | None = None  # "<dlq topic>:<partition>:<offset>"

    def match(self, rec: Record) -> bool:
        h = dlq.header_dict(rec.headers)
        at = datetime.fromisoformat(h.get(dlq.H_FIRST_FAILURE, "1970-01-01T00:00:00Z"))
        return (
            (self.ref is None or self.ref == ref_of(rec))
            and (self.topic is None or h.get(dlq.H_TOPIC) == self.topic)
            and (self.group is None or h.get(dlq.H_GROUP) == self.group)
            and (self.error_class is None or h.get(dlq.H_ERROR_CLASS) == self.error_class)
            and (self.since is None or at >= self.since)
            and (self.until is None or at <= self.until)
        )


def ref_of(rec: Record) -> str:
    return f"{rec.topic}:{rec.partition}:{rec.offset}"


async def read_dead_letters(bootstrap: str, filters: Filters) -> list[Record]:
    consumer = AIOKafkaConsumer(**client_options(bootstrap), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await partitions_of(bootstrap, suffix=".dlq")
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Record] = []
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, messages in batch.items():
                out += [
                    r
                    for r in map(Record.from_kafka, messages)
                    if not dlq.is_control(r) and filters.match(r)
                ]
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
            if not batch:
                for tp in list(pending):
                    if await consumer.position(tp) >= ends[tp]:
                        pending.discard(tp)
        return out
    finally:
        await consumer.stop()


async def publish(
    bootstrap: str,
    records: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]], int | None]],
) -> None:
    producer = AIOKafkaProducer(**client_options(bootstrap), enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for topic, key, value, headers, ts in records:
            await producer.send_and_wait(
                topic, value=value, key=key, headers=headers, timestamp_ms=ts
            )
    finally:
        await producer.stop()


def _filters(
    ref: str | None,
    topic: str | None,
    group: str | None,
    error_class: str | None,
    since: str | None,
    until: str | None,
) -> Filters:
    def when(v: str | None) -> datetime | None:
        return datetime.fromisoformat(v).astimezone(UTC) if v else None

    return Filters(topic, group, error_class, when(since), when(until), ref)


RefArg = typer.Argument(None, help="one dead letter: <dlq topic>:<partition>:<offset>")
TopicOpt = typer.Option(None, "--topic", help="original topic")
GroupOpt = typer.Option(None, "--group", help="consumer group")
ErrorOpt = typer.Option(None, "--error-class")
SinceOpt = typer.Option(None, "--since", help="first failure at or after (ISO 8601)")
UntilOpt = typer.Option(None, "--until", help="first failure at or before (ISO 8601)")


@app.command("list")
def list_(
    topic: str | None = TopicOpt,
    group: str | None = GroupOpt,
    error_class: str | None = ErrorOpt,
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
) -> None:
    """List dead letters, oldest first."""
    recs = asyncio.run(
        read_dead_letters(
            KafkaSettings().kafka_bootstrap_servers,
            _filters(None, topic, group, error_class, since, until),
        )
    )
    table = Table("ref", "group", "original", "key", "error", "attempts", "first failure")
    for r in recs:
        h = dlq.header_dict(r.headers)
        table.add_row(
            ref_of(r),
            h.get(dlq.H_GROUP, "?"),
            f"{h.get(dlq.H_TOPIC)}:{h.get(dlq.H_PARTITION)}:{h.get(dlq.H_OFFSET)}",
            r.key_str or "",
            f"{h.get(dlq.H_ERROR_CLASS)}: {h.get(dlq.H_ERROR_MESSAGE, '')[:80]}",
            h.get(dlq.H_ATTEMPTS, "?"),
            h.get(dlq.H_FIRST_FAILURE, "?"),
        )
    console.print(table)
    console.print(f"{len(recs)} dead letter(s)")


@app.command("show")
def show(ref: str = typer.Argument(..., help="<dlq topic>:<partition>:<offset>")) -> None:
    """Print one dead letter: headers and value."""
    recs = asyncio.run(read_dead_letters(KafkaSettings().kafka_bootstrap_servers, Filters(ref=ref)))
    if not recs:
        console.print(f"no dead letter {ref}")
        raise typer.Exit(1)
    r = recs[0]
    console.print_json(
        json.dumps({"ref": ref, "key": r.key_str, "headers": dlq.header_dict(r.headers)})
    )
    console.print(r.value.decode("utf-8", "replace"))


async def act(bootstrap: str, action: Action, filters: Filters) -> int:
    """Replay or purge every dead letter ``filters`` selects; how many. The one code path
    of ``paysaga dlq replay|purge`` and of the operator console."""
    if action == "purge" and filters == Filters():
        raise ValueError("refusing to purge everything: name a dead letter or a filter")
    out: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]], int | None]] = []
    for r in await read_dead_letters(bootstrap, filters):
        if action == "replay":
            out.append(dlq.replay_record(r))
        else:
            out.append((*dlq.release_record(r), None))
    await publish(bootstrap, out)
    return len(out)


def _act(action: Action, f: Filters) -> None:
    n = asyncio.run(act(KafkaSettings().kafka_bootstrap_servers, action, f))
    console.print(f"{action}: {n} dead letter(s)")


@app.command("replay")
def replay(
    ref: str | None = RefArg,
    topic: str | None = TopicOpt,
    group: str | None = GroupOpt,
    error_class: str | None = ErrorOpt,
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
) -> None:
    """Re-deliver dead letters to the group that failed them (safe to repeat)."""
    f = _filters(ref, topic, group, error_class, since, until)
    _act("replay", f)


@app.command("purge")
def purge(
    ref: str | None = RefArg,
    topic: str | None = TopicOpt,
    group: str | None = GroupOpt,
    error_class: str | None = ErrorOpt,
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
) -> None:
    """Give up on dead letters: their orders' blocked records are processed, they are not."""
    f = _filters(ref, topic, group, error_class, since, until)
    if f == Filters():
        console.print("refusing to purge everything: name a dead letter or a filter")
        raise typer.Exit(2)
    _act("purge", f)
