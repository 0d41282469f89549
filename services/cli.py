"""The ``paysaga`` command: operations for SREs and the local stack.

Sub-commands of a service live beside it (``services/<service>/cli.py``) and are
mounted here, so this file is only wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterator

import typer
from rich.table import Table

from services import devstack
from services.inventory.cli import app as stock_app
from services.payments.cli import app as unmatched_app
from services.runtime import migrate as migrations
from services.runtime import topics as topic_specs
from services.runtime.cli_dlq import app as dlq_app
from services.runtime.cli_outbox import app as outbox_app
from services.runtime.settings import SERVICES, DatabaseSettings, KafkaSettings
from services.runtime.terminal import make_console

app = typer.Typer(no_args_is_help=True, help="paysaga: a payment saga over Kafka")
dev = typer.Typer(no_args_is_help=True, help="The local stack (Kafka, PostgreSQL, services)")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics from topics.yaml")
app.add_typer(dev, name="dev")
app.add_typer(topics_app, name="topics")
app.add_typer(dlq_app, name="dlq")
app.add_typer(outbox_app, name="outbox")
app.add_typer(unmatched_app, name="unmatched")
app.add_typer(stock_app, name="stock")
console = make_console()


@topics_app.command("apply")
def topics_apply(
    partitions: int = typer.Option(None, help="override topics.yaml's partition count"),
) -> None:
    """Create missing topics, raise partitions and configs; report what cannot be fixed."""
    kafka = KafkaSettings()
    specs = topic_specs.load_specs(
        partitions=partitions or kafka.kafka_partitions,
        replication_factor=kafka.kafka_replication_factor,
        min_insync_replicas=kafka.kafka_min_insync_replicas,
    )
    report = asyncio.run(topic_specs.apply(kafka.kafka_bootstrap_servers, specs))
    for label, names in (
        ("created", report.created),
        ("partitions raised", report.partitions_raised),
        ("configs changed", report.configs_changed),
    ):
        for name in names:
            console.print(f"{label}: {name}")
    for line in report.drift:
        console.print(f"[red]drift[/red]: {line}")
    if not report.changed and not report.drift:
        console.print(f"{len(specs)} topics match topics.yaml")
    raise typer.Exit(1 if report.drift else 0)


@topics_app.command("render")
def topics_render(
    fmt: str = typer.Option(
        None, "--format", help="strimzi (Kafka, node pool, topics, users) | compose | acl"
    ),
    write: bool = typer.Option(False, "--write", help="regenerate every file under deploy/"),
) -> None:
    """Deployment manifests from topics.yaml: print one format, or --write them all."""
    from services.runtime import render

    if write:
        changed = render.write(render.deploy_files())
        for path in changed:
            console.print(f"wrote {path.relative_to(render.REPO)}")
        if not changed:
            console.print("deploy/ matches topics.yaml")
        return
    if fmt not in render.FORMATS:
        console.print(f"--format is one of {', '.join(render.FORMATS)} (or use --write)")
        raise typer.Exit(2)
    sys.stdout.write(render.FORMATS[fmt]())


@app.command()
def migrate() -> None:
    """Upgrade every service database to the latest migration."""
    db = DatabaseSettings()
    for service in SERVICES:
        if (migrations.SERVICES_DIR / service / "migrations").is_dir():
            migrations.upgrade(service, db.url_for(service))
            console.print(f"{service}: at head")


@app.command()
def reconcile(
    gateway: bool = typer.Option(False, "--gateway", help="also check the gateway's ledger"),
    order: list[str] = typer.Option(None, "--order", help="only these orders (repeatable)"),
) -> None:
    """Check docs/contract.md §3.1's rules across every store; exit 1 listing each violation."""
    from services.reconcile import check, requested_payments
    from services.runtime.settings import GatewayClientSettings

    gateway_url = GatewayClientSettings().gateway_url if gateway else None
    violations = check(gateway_url, order)
    if gateway_url:
        captured, abandoned = requested_payments(gateway_url, order)
        violations += captured
        for n in abandoned:  # informational: no money held
            console.print(f"notice: {n.rule} {n.subject} {n.detail}")
    if not violations:
        console.print("reconcile: no violation")
        return
    table = Table("rule", "subject", "detail")
    for v in violations:
        table.add_row(v.rule, v.subject, v.detail)
    console.print(table)
    console.print(f"reconcile: {len(violations)} violation(s)")
    raise typer.Exit(1)


@contextlib.contextmanager
def _stack_errors() -> Iterator[None]:
    """A stack that cannot be provisioned says why in one sentence, not a traceback."""
    try:
        yield
    except devstack.StackError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@dev.command("up")
def dev_up(profile: str = "dev") -> None:
    with _stack_errors():
        devstack.up(profile)


@dev.command("down")
def dev_down(profile: str = "dev") -> None:
    with _stack_errors():
        devstack.down(profile)


@dev.command("status")
def dev_status(profile: str = "dev") -> None:
    table = Table("component", "state")
    with _stack_errors():
        states = devstack.status(profile)
    for name, state in states.items():
        table.add_row(name, state)
    console.print(table)


@dev.command("clean")
def dev_clean() -> None:
    """Stop every profile; remove its PostgreSQL folder kept outside the checkout."""
    with _stack_errors():
        devstack.clean()


@dev.command("test", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def dev_test(ctx: typer.Context) -> None:
    """Bring up the test profile, run pytest with the extra arguments, tear down."""
    with _stack_errors():
        code = devstack.run_tests(list(ctx.args))
    sys.exit(code)


if __name__ == "__main__":
    app()
