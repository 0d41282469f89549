"""A tiny service on the runtime, for proving the runtime's guarantees.

``Credit {account, amount, seq, sleep_s?}`` adds to an account and records the
application (one row per application: applying twice shows as two rows); with
``--out-topic`` it emits ``Credited`` through the outbox. ``Credited`` consumed by a
downstream instance is recorded the same way. A missing field is a permanent error.
A dead-lettered record flags its account (``ledger_flags``), as payments flags an order.
``fail_until_file`` names a file: while it exists the record fails permanently (a
condition an operator fixes, then replays the dead letter); ``transient_until_file``
likewise fails transiently (a dependency that is down).
"""

from __future__ import annotations

import argparse
import asyncio
import os

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.runtime.errors import PermanentError
from services.runtime.messages import Context, Record, Route
from services.runtime.service import Service, make_engine, run_service


class Credited(BaseModel):
    """The event the ledger emits (``--out-topic``)."""

    account: str
    amount: int
    seq: int


metadata = MetaData()
applied = Table(
    "ledger_applied",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("consumer_group", String(128), nullable=False, index=True),
    Column("account", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("event_id", String(64), nullable=False),
    # which process applied it: tests check that work really moved between members
    Column("pid", Integer, nullable=True),
)

flags = Table(
    "ledger_flags",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("consumer_group", String(128), nullable=False),
    Column("account", String(64), nullable=True),
    Column("error_class", String(200), nullable=False),
)


def build(args: argparse.Namespace) -> Service:
    group = args.group

    async def on_credit(ctx: Context) -> None:
        p = ctx.payload
        try:
            account, amount, seq = str(p["account"]), int(p["amount"]), int(p["seq"])
        except (KeyError, ValueError) as exc:
            raise PermanentError("schema_violation", f"Credit payload: {exc!r}") from exc
        if p.get("fail_until_file") and os.path.exists(p["fail_until_file"]):
            raise PermanentError("not_yet_fixed", str(p["fail_until_file"]))
        if p.get("transient_until_file") and os.path.exists(p["transient_until_file"]):
            raise TimeoutError(f"unavailable: {p['transient_until_file']}")
        if p.get("sleep_s"):
            await asyncio.sleep(float(p["sleep_s"]))
        await ctx.conn.execute(
            insert(applied).values(
                consumer_group=group,
                account=account,
                seq=seq,
                amount=amount,
                event_id=ctx.event_id,
                pid=os.getpid(),
            )
        )
        if args.out_topic:
            await ctx.emit(
                args.out_topic, Credited(account=account, amount=amount, seq=seq), key=account
            )

    async def on_credited(ctx: Context) -> None:
        p = ctx.payload
        await ctx.conn.execute(
            insert(applied).values(
                consumer_group=group,
                account=p["account"],
                seq=p["seq"],
                amount=p["amount"],
                event_id=ctx.event_id,
                pid=os.getpid(),
            )
        )

    async def flag(conn: AsyncConnection, rec: Record, exc: BaseException) -> None:
        await conn.execute(
            insert(flags).values(
                consumer_group=group, account=rec.key_str, error_class=type(exc).__name__
            )
        )

    return Service(
        name="ledger",
        group=group,
        engine=make_engine(args.db_url),
        database_url=args.db_url,
        bootstrap=args.bootstrap,
        routes=[Route(args.in_topic, handlers={"Credit": on_credit, "Credited": on_credited})],
        registry=CollectorRegistry(),
        http_port=args.port,
        on_dead_letter=flag,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--in-topic", "--group", "--db-url", "--bootstrap"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--out-topic")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run_service(lambda: build(args))


if __name__ == "__main__":
    main()
