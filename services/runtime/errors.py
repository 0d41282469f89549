"""The one place that decides whether a failure is permanent or transient.

Permanent: the record itself is wrong (bad JSON, schema violation, unknown event type,
a domain rejection that must be seen by a human) — retrying cannot help, so it goes to
the dead-letter topic at once. Transient: something around the record is unavailable
(database, broker, gateway 5xx, a timeout) — retried in place with backoff, then
dead-lettered when the budget is spent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypeVar

import httpx
import psycopg
import sqlalchemy.exc
from aiokafka import errors as kafka_errors
from aiokafka.errors import KafkaError
from pydantic import BaseModel, ValidationError

from schemas.carddata import redact
from schemas.events import parse_payload

M = TypeVar("M", bound=BaseModel)


class PermanentError(Exception):
    """The record can never be processed as it is. ``reason`` is a short snake_case code."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


def describe(exc: BaseException) -> str:
    """``exc``'s message without card data (``schemas.carddata.redact``): what the
    runtime logs, stores and puts in dead-letter headers about an error."""
    return redact(f"{exc}").text


def said(exc: BaseException) -> str:
    """How a log line names an error: its class and :func:`describe`."""
    return f"{type(exc).__name__}: {describe(exc)}"


def schema_violation(exc: ValidationError) -> PermanentError:
    """``exc`` as a ``schema_violation`` naming each bad field and what is wrong with it
    — never the input: a rejected payload may carry card data (an extra ``cvv`` field),
    and this message is logged, stored and put in dead-letter headers. Not "field: msg":
    the redaction would take "cvv: Extra" for a card-data key's value."""
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc']))} ({e['msg']})"
        for e in exc.errors(include_input=False, include_url=False)
    )
    return PermanentError("schema_violation", f"{exc.title}: {problems}")


def validated(model: type[M], data: Mapping[str, Any]) -> M:
    """``data`` as ``model``; a ``schema_violation`` (permanent) if it does not fit."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise schema_violation(exc) from exc


def validated_event(event_type: str, payload: dict[str, Any]) -> BaseModel:
    """``payload`` as the model of ``event_type`` (``schemas.events.parse_payload``); a
    ``schema_violation`` (permanent) if it does not fit."""
    try:
        return parse_payload(event_type, payload)
    except ValidationError as exc:
        raise schema_violation(exc) from exc


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PermanentError | ValidationError | ValueError | KeyError | TypeError):
        return False
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | ConnectionError):
        return True
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        # connection-level failures (server gone, cannot connect), serialization and
        # deadlock conflicts are worth retrying; constraint violations and bad SQL are not.
        orig = exc.orig
        return bool(exc.connection_invalidated) or isinstance(
            orig,
            psycopg.OperationalError
            | psycopg.errors.SerializationFailure
            | psycopg.errors.DeadlockDetected
            | psycopg.errors.AdminShutdown
            | psycopg.errors.CannotConnectNow
            # a primary demoted during a failover answers read-only until clients reconnect
            | psycopg.errors.ReadOnlySqlTransaction,
        )
    if isinstance(exc, sqlalchemy.exc.TimeoutError | psycopg.OperationalError):
        return True
    # broker errors met while handling (a DLQ produce, say) and gateway transport errors
    return isinstance(exc, KafkaError | httpx.TransportError)


#: What Kafka answers about a record itself (its size, its topic, the right to write
#: there): sending the same record again is refused again until an operator changes the
#: topic (``max.message.bytes``, ACLs) — unlike a broker or leader that is away. A topic
#: that does not exist (yet) is not among them: ``paysaga topics apply`` creates it and
#: the relay goes on by itself.
_REFUSED_BY_KAFKA = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.CorruptRecordException,
)


def refused_by_kafka(exc: BaseException) -> bool:
    """Whether a produce failed for good: the record must be set aside for an operator
    (the outbox relay's ``dead`` rows), since retrying it in place would block forever."""
    return isinstance(exc, _REFUSED_BY_KAFKA)
