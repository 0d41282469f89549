"""The one logging setup of every paysaga process (docs/contract.md §3.6).

One JSON object per line on stderr: ``ts`` (UTC, ISO 8601), ``level``, ``service``,
``logger``, ``msg``, ``exc`` (the traceback, if any), and the fields bound while a
record is handled or an intent round runs (``bound``): ``order_id``, ``event_id``,
``correlation_id``, ``trace_id``. ``PAYSAGA_LOG_FORMAT=text`` gives plain lines for
local development. Either way every text goes through ``schemas.carddata.redact``
(identifier fields stay as they are): the last guard behind the runtime's redacted
error texts — an exception from a library may quote the record it choked on.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from schemas.carddata import is_id_key, redact

#: the fields bound in this task (``bound``), on every log line written meanwhile
_fields: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "paysaga_log_fields", default=MappingProxyType({})
)


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Add ``fields`` (those not None) to every log line of this task until the block
    ends."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


def _redacted(key: str, value: str) -> str:
    return value if is_id_key(key) else redact(value).text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, card data redacted."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields.get(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(
            {k: _redacted(k, v) if isinstance(v, str) else v for k, v in doc.items()},
            ensure_ascii=False,
        )


class TextFormatter(logging.Formatter):
    """Plain lines (``PAYSAGA_LOG_FORMAT=text``), bound fields appended, card data
    redacted over the whole line, traceback included."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in _fields.get().items())
        head, sep, rest = line.partition("\n")
        return redact(f"{head} [{fields}]{sep}{rest}" if fields else line).text


def service_name() -> str:
    """The running service's name, from its module (``services.<name>.app``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    parts = (spec.name if spec else "").split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "services" else "paysaga"


def configure_logging(service: str | None = None) -> None:
    """Log to stderr in ``PAYSAGA_LOG_FORMAT`` (``json``, the default, or ``text``) at
    ``PAYSAGA_LOG_LEVEL``; spans exported if ``PAYSAGA_OTLP_ENDPOINT`` is set."""
    from services.runtime.tracing import configure_tracing

    name = service or service_name()
    handler = logging.StreamHandler()
    text = os.environ.get("PAYSAGA_LOG_FORMAT", "json").lower() == "text"
    handler.setFormatter(TextFormatter(name) if text else JsonFormatter(name))
    logging.basicConfig(
        level=os.environ.get("PAYSAGA_LOG_LEVEL", "INFO"), handlers=[handler], force=True
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    configure_tracing(name)
