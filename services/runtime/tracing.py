"""W3C trace context and spans (docs/contract.md §3.6).

Every record paysaga writes carries a ``traceparent`` header. The rule: each record
continues the trace of the record whose handling wrote it — the consumed record, or for
an intent worker's event the record that recorded the intent — as a child span; an input
without a (valid) ``traceparent`` starts a new trace. Two inputs meeting (an order and
its gateway confirmation) do not merge traces: what the confirmation causes continues
the confirmation's.

``span(name, parent)`` opens a span per handled record, intent round and gateway call
through OpenTelemetry's API (``opentelemetry-api``): a no-op unless an exporter is set up
(``PAYSAGA_OTLP_ENDPOINT``: ``configure_tracing`` then loads the SDK and the OTLP/HTTP
exporter of the ``otel`` extra). Either way the span has its own traceparent (the
exporter's span id, or a random one), which ``current()`` returns while it is open and
which the records written meanwhile carry (``outbox.write_event``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

log = logging.getLogger("paysaga.tracing")

#: the W3C trace context header
TRACEPARENT = "traceparent"
#: where spans are exported to (OTLP over HTTP); unset: spans are not recorded
OTLP_ENDPOINT_ENV = "PAYSAGA_OTLP_ENDPOINT"

_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "paysaga_traceparent", default=None
)
_tracer = trace.get_tracer("paysaga")


def parse(traceparent: str | bytes | None) -> tuple[str, str, int] | None:
    """(trace id, span id, flags) of a valid version-00 ``traceparent``, else None."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    match = _FORMAT.match(traceparent.strip().lower()) if traceparent else None
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return match.group(1), match.group(2), int(match.group(3), 16)


def format_traceparent(trace_id: str, span_id: str, flags: int = 1) -> str:
    return f"00-{trace_id}-{span_id}-{flags:02x}"


def child_of(parent: str | bytes | None) -> str:
    """A new span's traceparent: in ``parent``'s trace, or in a new trace if ``parent``
    is missing or malformed."""
    parsed = parse(parent)
    trace_id = parsed[0] if parsed else secrets.token_hex(16)
    return format_traceparent(trace_id, secrets.token_hex(8), parsed[2] if parsed else 1)


def current() -> str | None:
    """The traceparent of the span open in this task, if any."""
    return _current.get()


def trace_id_of(traceparent: str | None) -> str | None:
    parsed = parse(traceparent)
    return parsed[0] if parsed else None


def set_attribute(key: str, value: str | int) -> None:
    """An attribute of the span open in this task (nothing without an exporter)."""
    trace.get_current_span().set_attribute(key, value)


@contextlib.contextmanager
def span(
    name: str,
    parent: str | bytes | None,
    attributes: Mapping[str, str | int] | None = None,
) -> Iterator[str]:
    """A span named ``name``, child of ``parent`` (a new trace without one); yields its
    traceparent, which is ``current()`` until it ends."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # no SDK set up: the API's span would be a no-op, so only the traceparent is
        # carried (a third of the cost per handled record)
        own = child_of(parent)
        token = _current.set(own)
        try:
            yield own
        finally:
            _current.reset(token)
        return
    parsed = parse(parent)
    context = None
    if parsed is not None:
        remote = SpanContext(
            int(parsed[0], 16),
            int(parsed[1], 16),
            is_remote=True,
            trace_flags=TraceFlags(parsed[2]),
        )
        context = trace.set_span_in_context(NonRecordingSpan(remote))
    with _tracer.start_as_current_span(
        name, context=context, attributes=dict(attributes or {})
    ) as opened:
        ctx = opened.get_span_context()
        if opened.is_recording() and ctx.is_valid:
            own = format_traceparent(
                f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", int(ctx.trace_flags)
            )
        else:  # no SDK: the API's no-op span has no ids of its own
            own = child_of(parent)
        token = _current.set(own)
        try:
            yield own
        finally:
            _current.reset(token)


def configure_tracing(service: str) -> None:
    """Export spans over OTLP/HTTP to ``PAYSAGA_OTLP_ENDPOINT`` if it is set (needs the
    ``otel`` extra); otherwise spans stay no-ops."""
    endpoint = os.environ.get(OTLP_ENDPOINT_ENV)
    if not endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "%s is set but the OpenTelemetry SDK is not installed (pip install 'paysaga[otel]'):"
            " spans are not exported",
            OTLP_ENDPOINT_ENV,
        )
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"paysaga-{service}"}))
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
