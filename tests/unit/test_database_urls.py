"""A database URL names its server once: every service's database and every raw
connection (the relay's wake-up, the CLI's) reach that server the same way."""

from __future__ import annotations

import psycopg.conninfo
import pytest

from services.runtime.settings import DatabaseSettings, database_url_of, libpq_conninfo


def test_a_services_database_is_named_on_the_servers_url() -> None:
    url = database_url_of("postgresql+psycopg://paysaga@db.internal:5433", "paysaga_orders")
    assert url == "postgresql+psycopg://paysaga@db.internal:5433/paysaga_orders"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (  # a socket directory, its port and sslmode: in the query
            database_url_of(
                "postgresql+psycopg://paysaga@/?host=/run/pg&port=56433&sslmode=verify-full",
                "paysaga_capture",
            ),
            {"user": "paysaga", "dbname": "paysaga_capture", "host": "/run/pg", "port": "56433"}
            | {"sslmode": "verify-full"},
        ),
        (  # a user and password that need quoting
            "postgresql+psycopg://pay%40saga:p%2Fw%3A%20d%2B@10.0.0.7:6432/paysaga_refunds",
            {"user": "pay@saga", "password": "p/w: d+", "host": "10.0.0.7", "port": "6432"}
            | {"dbname": "paysaga_refunds"},
        ),
        (  # server options with spaces: one libpq value, not "+"-joined words
            "postgresql+psycopg://paysaga@db/paysaga_orders?options=-c%20statement_timeout%3D5s",
            {"user": "paysaga", "host": "db", "dbname": "paysaga_orders"}
            | {"options": "-c statement_timeout=5s"},
        ),
        (  # several hosts, each with its port: tried in turn, as the engine tries them
            "postgresql+psycopg://paysaga@/paysaga_payments?host=db1:5432&host=db2:5433",
            {"user": "paysaga", "dbname": "paysaga_payments", "host": "db1,db2"}
            | {"port": "5432,5433"},
        ),
        (  # an IPv6 address
            "postgresql+psycopg://paysaga@[::1]:5433/paysaga_inventory",
            {"user": "paysaga", "host": "::1", "port": "5433", "dbname": "paysaga_inventory"},
        ),
    ],
)
def test_a_raw_connection_reaches_the_engines_server(url: str, expected: dict[str, str]) -> None:
    info = psycopg.conninfo.conninfo_to_dict(libpq_conninfo(url))
    assert info == expected | {"connect_timeout": "5"}


def test_the_query_of_the_servers_url_is_kept_for_every_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = "postgresql+psycopg://paysaga@/?host=/run/pg&port=56433&sslmode=verify-full"
    monkeypatch.setenv("PAYSAGA_DATABASE_URL", server)
    assert DatabaseSettings().url_for("capture") == database_url_of(server, "paysaga_capture")
    assert "sslmode=verify-full" in DatabaseSettings().url_for("capture")


def test_a_connect_timeout_the_url_sets_wins() -> None:
    url = "postgresql+psycopg://paysaga@127.0.0.1:55432/x?connect_timeout=30"
    assert psycopg.conninfo.conninfo_to_dict(libpq_conninfo(url))["connect_timeout"] == "30"


def test_an_explicit_url_for_one_service_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSAGA_DATABASE_URL", "postgresql+psycopg://paysaga@a:1")
    monkeypatch.setenv("PAYSAGA_ORDERS_DATABASE_URL", "postgresql+psycopg://o@b:2/orders")
    assert DatabaseSettings().url_for("orders") == "postgresql+psycopg://o@b:2/orders"
    assert (
        DatabaseSettings().url_for("refunds") == "postgresql+psycopg://paysaga@a:1/paysaga_refunds"
    )
