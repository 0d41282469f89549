"""Settings shared by every paysaga process.

Everything comes from environment variables prefixed ``PAYSAGA_`` (documented in the
README). Settings objects are built in ``main()``; nothing here runs at import.
"""

from __future__ import annotations

import json
from typing import Literal

from psycopg.conninfo import make_conninfo
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.engine import make_url

#: The documented local development secret: used by the local stack when
#: PAYSAGA_GATEWAY_SECRETS is not set (make up, make demo, make test) — never in code paths
#: that run outside the local stack.
LOCAL_DEV_GATEWAY_SECRETS = json.dumps({"simgw": ["whsec_local_dev"]})

SERVICES = ("payments", "inventory", "capture", "refunds", "orders")


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    #: overrides topics.yaml's partition count for every topic (co-partitioned by order id)
    kafka_partitions: int | None = None
    kafka_replication_factor: int = 1
    #: ``min.insync.replicas`` of every topic, for ``topics apply`` (default: topics.yaml's,
    #: never above the replication factor)
    kafka_min_insync_replicas: int | None = None
    #: how every client (services, bridge, CLI, monitor) connects; see
    #: ``services.runtime.kafka.client_options``
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    #: PEM file of the CA that signed the brokers' certificates (default: the system's CAs)
    kafka_ssl_cafile: str | None = None

    @model_validator(mode="after")
    def _credentials_with_sasl(self) -> KafkaSettings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"PAYSAGA_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs"
                " PAYSAGA_KAFKA_SASL_USERNAME and PAYSAGA_KAFKA_SASL_PASSWORD"
            )
        return self


class DatabaseSettings(BaseSettings):
    """Database location: ``PAYSAGA_<SERVICE>_DATABASE_URL`` wins, else the server URL
    ``PAYSAGA_DATABASE_URL`` plus the service's database name ``paysaga_<service>``."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    database_url: str = "postgresql+psycopg://paysaga@127.0.0.1:55432"
    payments_database_url: str | None = None
    inventory_database_url: str | None = None
    capture_database_url: str | None = None
    refunds_database_url: str | None = None
    orders_database_url: str | None = None

    def url_for(self, service: str) -> str:
        explicit: str | None = getattr(self, f"{service}_database_url", None)
        if explicit:
            return explicit
        return database_url_of(self.database_url, f"paysaga_{service}")


#: SQLAlchemy's psycopg dialect, as the engines use it: what reads a database URL into
#: connection arguments (``libpq_conninfo``) and compiles the driver's statements
PSYCOPG_DIALECT = pg_psycopg.dialect()  # type: ignore[no-untyped-call]


def database_url_of(server_url: str, dbname: str) -> str:
    """The URL of database ``dbname`` on the server of ``server_url``: its query (a
    socket directory, ``sslmode`` …) kept."""
    return make_url(server_url).set(database=dbname).render_as_string(hide_password=False)


def libpq_conninfo(url: str) -> str:
    """A SQLAlchemy URL as libpq takes it (a raw psycopg connection: the relay's wake-up,
    the CLI's): the connection arguments SQLAlchemy's psycopg dialect gives the engine —
    the same server (several hosts, a socket directory), user, password, database and
    query parameters (``sslmode``, ``options`` …) — quoted for libpq, with a 5 s connect
    timeout unless the URL sets one."""
    _, arguments = PSYCOPG_DIALECT.create_connect_args(make_url(url))  # type: ignore[no-untyped-call]
    return make_conninfo("", **({"connect_timeout": 5} | arguments))


class GatewaySecrets(BaseSettings):
    """``PAYSAGA_GATEWAY_SECRETS``: JSON object gateway id -> list of secrets. Required:
    a service that verifies confirmations refuses to start without it."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    gateway_secrets: dict[str, list[str]] = Field(...)

    @field_validator("gateway_secrets")
    @classmethod
    def _non_empty(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if not value or not all(isinstance(s, list) and s and all(s) for s in value.values()):
            raise ValueError("PAYSAGA_GATEWAY_SECRETS must map each gateway id to >= 1 secret")
        return value


class GatewayClientSettings(BaseSettings):
    """Where the payment gateway is (docs/contract.md §4) and how long a call may take."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    gateway_url: str = "http://127.0.0.1:8090"
    gateway_timeout_s: float = 5.0
    gateway_max_attempts: int = 4
