"""``paysaga outbox list|retry`` — outbox rows Kafka refused for good, for SREs.

The relay sets such a row aside (``dead``: too large for its topic's
``max.message.bytes``, a topic it may not write to, ...) with the error, and the later
rows of its key wait behind it; every other key goes on. Nothing is deleted. Fix the
cause (raise the topic's ``max.message.bytes`` in topics.yaml and run ``paysaga topics
apply``, grant the ACL), then ``retry``: the row goes back to the relay, which publishes
it and then the rows behind it, in order. A row refused again is set aside again.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

import psycopg
import typer
from rich.table import Table

from services.runtime.outbox import OUTBOX_CHANNEL
from services.runtime.relay import event_type_of
from services.runtime.settings import SERVICES, DatabaseSettings, libpq_conninfo
from services.runtime.terminal import make_console
from services.runtime.wakeup import notify_statement

app = typer.Typer(no_args_is_help=True, help="Outbox rows Kafka refused for good")
console = make_console()


@dataclasses.dataclass(frozen=True)
class DeadRow:
    service: str
    id: int
    topic: str
    key: str
    event_type: str
    size: int
    dead_at: datetime
    error: str
    #: later rows of its key, waiting behind it
    blocked: int


def _conninfo(service: str) -> str:
    return libpq_conninfo(DatabaseSettings().url_for(service))


def dead_rows(service: str) -> list[DeadRow]:
    """The service's dead outbox rows, oldest first."""
    with psycopg.connect(_conninfo(service), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.id, d.topic, d.key, d.value, d.dead_at, d.dead_error,"
            " (SELECT count(*) FROM outbox o WHERE o.key = d.key AND o.id > d.id"
            "   AND o.sent_at IS NULL AND o.dead_at IS NULL)"
            " FROM outbox d WHERE d.dead_at IS NOT NULL AND d.sent_at IS NULL ORDER BY d.id"
        ).fetchall()
    return [
        DeadRow(
            service,
            id_,
            topic,
            (key or b"").decode(errors="replace"),
            event_type_of(value),
            len(value),
            dead_at,
            error or "",
            blocked,
        )
        for id_, topic, key, value, dead_at, error, blocked in rows
    ]


def _service(name: str) -> str:
    if name not in SERVICES:
        raise typer.BadParameter(f"one of {', '.join(SERVICES)}")
    return name


@app.command("list")
def list_(
    service: str | None = typer.Option(None, "--service", help="only this service's outbox"),
) -> None:
    """List dead outbox rows of every service, oldest first."""
    rows = [r for s in ([_service(service)] if service else SERVICES) for r in dead_rows(s)]
    table = Table("service", "row", "topic", "key", "event", "bytes", "dead since", "blocked",
                  "error")  # fmt: skip
    for r in rows:
        table.add_row(r.service, str(r.id), r.topic, r.key, r.event_type, str(r.size),
                      r.dead_at.isoformat(), str(r.blocked), r.error[:120])  # fmt: skip
    console.print(table)
    console.print(f"{len(rows)} dead outbox row(s)")


@app.command("retry")
def retry(
    service: str = typer.Argument(..., help="the service whose outbox holds the rows"),
    ids: list[int] = typer.Argument(None, help="dead row ids (see `paysaga outbox list`)"),
    all_: bool = typer.Option(False, "--all", help="every dead row of the service"),
) -> None:
    """Give dead rows back to the relay, once their cause is fixed (safe to repeat)."""
    _service(service)
    if not ids and not all_:
        console.print("name the rows to retry, or --all")
        raise typer.Exit(2)
    with psycopg.connect(_conninfo(service), autocommit=True) as conn, conn.transaction():
        retried = [
            r[0]
            for r in conn.execute(
                "UPDATE outbox SET dead_at = NULL WHERE dead_at IS NOT NULL AND sent_at IS NULL"
                " AND (%s OR id = ANY(%s)) RETURNING id",
                (all_, ids or []),
            )
        ]
        conn.execute(notify_statement(OUTBOX_CHANNEL))  # wake the relay
    for id_ in sorted(retried):
        console.print(f"retry: {service} outbox row {id_} goes back to the relay")
    if all_ and not retried:
        console.print(f"{service}: no dead outbox row")
    missing = sorted(set(ids or []) - set(retried))
    for id_ in missing:
        console.print(f"{service}: no dead outbox row {id_}")
    raise typer.Exit(1 if missing else 0)
