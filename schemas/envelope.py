"""The event envelope of docs/contract.md §1, plus the saga's `causation_id` and `saga_seq`.

Pure: no clock, no randomness, no I/O. Callers supply `now` and `event_id`, so an
envelope built twice from the same inputs is byte-for-byte the same record.
"""

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, Strict, field_serializer

__all__ = ["Envelope", "dump", "event_type_of", "new_envelope"]


class Envelope(BaseModel):
    """A record value on any paysaga topic.

    Guarantees: unknown envelope fields are ignored (dropped), as docs/contract.md §1 requires;
    `occurred_at` must carry a UTC offset (naive times are rejected), is normalised
    to UTC and serialises as RFC 3339 with a trailing "Z". The payload is left as a
    dict: validate it with `schemas.events.parse_payload` once `event_type` is known.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: str = Field(min_length=1, max_length=64, description="Unique per event; dedupe key")
    event_type: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$", max_length=64)
    schema_version: Annotated[int, Strict()] = Field(ge=1)
    occurred_at: AwareDatetime
    correlation_id: str | None = None
    causation_id: str | None = Field(
        default=None, description="event_id of the event that caused this one"
    )
    saga_seq: Annotated[int, Strict()] | None = Field(
        default=None, ge=1, description="1 for a saga root, the cause's saga_seq + 1 otherwise"
    )
    payload: dict[str, Any]

    @field_serializer("occurred_at", when_used="json")
    def _rfc3339_utc(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event_type_of(model: type[BaseModel]) -> str:
    """The event type of a payload model, as an envelope's `event_type` names it: the
    model's class name. The one place that says so: producers, the registry of
    `schemas.events` and the consumers' routes all ask here."""
    return model.__name__


def new_envelope(
    event_type: str,
    payload_model: BaseModel,
    *,
    now: datetime,
    event_id: str,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    saga_seq: int | None = None,
    schema_version: int = 1,
) -> dict[str, Any]:
    """Wrap a validated payload model in an envelope; return its JSON-ready dict.

    Pure: the same arguments always give the same dict. Every registered payload
    model is named after its event type, so a mismatch between `event_type` and the
    model's class name is a programming error and raises `ValueError` rather than
    publishing a record no consumer can parse. `now` must be timezone-aware.
    """
    if event_type_of(type(payload_model)) != event_type:
        raise ValueError(
            f"event_type {event_type!r} does not match payload model "
            f"{type(payload_model).__name__!r}"
        )
    envelope = Envelope(
        event_id=event_id,
        event_type=event_type,
        schema_version=schema_version,
        occurred_at=now,
        correlation_id=correlation_id,
        causation_id=causation_id,
        saga_seq=saga_seq,
        payload=payload_model.model_dump(mode="json"),
    )
    return envelope.model_dump(mode="json")


def dump(envelope: Envelope | Mapping[str, Any]) -> bytes:
    """Serialise an envelope to compact UTF-8 JSON (the Kafka record value).

    A mapping is validated as an `Envelope` first, so only well-formed envelopes are
    ever emitted; unknown top-level keys are dropped.
    """
    model = envelope if isinstance(envelope, Envelope) else Envelope.model_validate(envelope)
    return model.model_dump_json().encode()
