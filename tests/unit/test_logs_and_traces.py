"""The one logging setup (JSON lines, bound ids, card data redacted) and the W3C trace
context of ``services.runtime.tracing`` (docs/contract.md §3.6)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from services.runtime import outbox, tracing
from services.runtime.logs import JsonFormatter, TextFormatter, bound, configure_logging
from services.runtime.messages import Context, Record
from services.runtime.outbox import Cause

PAN = "4111 1111 1111 1111"
ORDER_ID = "7319451082265194051"  # all digits, Luhn-valid: an id, kept as it is


def record(msg: str, *args: Any, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError(f"could not parse {{'card_number': '{PAN}'}}")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("paysaga.t", logging.WARNING, __file__, 1, msg, args, info)


def test_a_json_line_has_the_fields_and_the_bound_ids() -> None:
    with bound(order_id=ORDER_ID, event_id="e1", correlation_id=None):
        line = JsonFormatter("payments").format(record("order %s rejected", "o1"))
    doc = json.loads(line)
    assert doc["level"] == "WARNING"
    assert doc["service"] == "payments"
    assert doc["logger"] == "paysaga.t"
    assert doc["msg"] == "order o1 rejected"
    assert (doc["order_id"], doc["event_id"]) == (ORDER_ID, "e1")
    assert "correlation_id" not in doc  # None: not known, not bound
    assert datetime.fromisoformat(doc["ts"]).tzinfo is not None
    assert "\n" not in line
    # outside the block: nothing bound
    assert "order_id" not in json.loads(JsonFormatter("x").format(record("m")))


def test_card_numbers_are_redacted_in_the_message_and_the_traceback() -> None:
    line = JsonFormatter("payments").format(record("card %s seen", PAN, exc=True))
    doc = json.loads(line)
    assert "Traceback" in doc["exc"]
    assert "ValueError" in doc["exc"]
    for digits in (PAN, PAN.replace(" ", "")):
        assert digits not in line
    assert "[REDACTED-PAN]" in doc["msg"]


def test_text_format_appends_the_bound_ids_and_redacts() -> None:
    with bound(order_id="o1"):
        line = TextFormatter("capture").format(record("card %s", PAN))
    assert " WARNING capture paysaga.t card " in line
    assert "[order_id=o1]" in line
    assert PAN not in line


def test_bound_ids_follow_the_task_not_the_process() -> None:
    formatter = JsonFormatter("t")

    async def handle(order_id: str) -> str:
        with bound(order_id=order_id):
            await asyncio.sleep(0)
            return str(json.loads(formatter.format(record("m")))["order_id"])

    async def both() -> list[str]:
        return list(await asyncio.gather(handle("a"), handle("b")))

    assert asyncio.run(both()) == ["a", "b"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_configure_logging_writes_the_chosen_format(
    fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PAYSAGA_LOG_FORMAT", fmt)
    monkeypatch.delenv(tracing.OTLP_ENDPOINT_ENV, raising=False)
    configure_logging("orders")
    try:
        logging.getLogger("paysaga.t").warning("hello %s", "there")
        err = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        logging.basicConfig(force=True)
    if fmt == "json":
        assert json.loads(err)["msg"] == "hello there"
        assert json.loads(err)["service"] == "orders"
    else:
        assert err.endswith("WARNING orders paysaga.t hello there")


# --- traces ----------------------------------------------------------------------------

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_span_continues_its_parents_trace_with_its_own_span_id() -> None:
    assert tracing.current() is None
    with tracing.span("handle", TP.encode()) as tp:
        assert tracing.current() == tp
        parsed = tracing.parse(tp)
        assert parsed is not None
        assert parsed[0] == "0af7651916cd43dd8448eb211c80319c"
        assert parsed[1] != "b7ad6b7169203331"
        with tracing.span("gateway capture", tracing.current()) as inner:
            assert tracing.trace_id_of(inner) == parsed[0]
            assert inner != tp
        assert tracing.current() == tp
    assert tracing.current() is None


@pytest.mark.parametrize(
    "parent",
    [
        None,
        "",
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # invalid trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # invalid span id
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # unknown version
    ],
)
def test_without_a_valid_parent_a_span_starts_a_new_trace(parent: str | None) -> None:
    with tracing.span("handle", parent) as tp:
        parsed = tracing.parse(tp)
    assert parsed is not None
    assert parsed[0] != "0af7651916cd43dd8448eb211c80319c"
    assert tp.endswith("-01")


def test_a_handled_records_cause_carries_its_span() -> None:
    rec = Record("t", 0, 5, b"k", b"{}", (("traceparent", TP.encode()),), 0)
    ctx = Context(conn=None, record=rec, envelope=None, now=datetime.now(UTC), traceparent=TP)  # type: ignore[arg-type]
    assert ctx.cause.traceparent == TP


class _Executed:
    """A connection outside a deferring transaction: ``deferred`` writes at once."""

    dialect = psycopg_dialect()

    def __init__(self) -> None:
        self.values: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    async def execute(self, _sql: str, params: dict[str, Any]) -> None:
        # the outbox rows' values, one array per column (``deferred.Rows``): the headers
        # go as JSON text
        headers = next(v for k, v in params.items() if k.endswith("_headers"))
        self.values += [{"headers": json.loads(h)} for h in headers]

    def cursor(self, **_: Any) -> _Executed:
        return self

    @property
    def sync_connection(self) -> _Executed:
        return self

    # the driver's connection under it (``services.runtime.driver``): itself, heard by
    # no engine listener
    connection = driver_connection = sync_connection
    dispatch = SimpleNamespace(before_cursor_execute=[], after_cursor_execute=[])

    def get_transaction(self) -> object:
        return self

    def in_nested_transaction(self) -> bool:
        return False

    def in_transaction(self) -> bool:
        return True


class Noted(BaseModel):
    order_id: str


def _written_header(cause: Cause) -> str:
    """The headers ``write_event`` writes to the outbox row (the statement's values)."""
    conn = _Executed()
    event = Noted(order_id="o1")
    now = datetime.now(UTC)
    asyncio.run(outbox.write_event(conn, "t", event, key="o1", now=now, cause=cause))  # type: ignore[arg-type]
    [(name, value)] = conn.values[0]["headers"]
    assert name == "traceparent"
    return str(value)


def test_every_written_event_carries_a_traceparent() -> None:
    assert _written_header(Cause("e1", traceparent=TP)) == TP  # the cause's
    with tracing.span("round", TP) as tp:
        assert _written_header(Cause("e1")) == tp  # the open span's
    fresh = _written_header(Cause("e1"))  # outside any span (a CLI): a new trace
    assert tracing.parse(fresh) is not None
    assert tracing.trace_id_of(fresh) != tracing.trace_id_of(TP)


def test_the_spans_are_exported_over_otlp_as_children_of_the_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``PAYSAGA_OTLP_ENDPOINT`` set, the spans arrive at an OTLP/HTTP receiver (a
    local one here, decoding what it is sent), and they are the ones whose traceparent
    the records carry. The ``otel`` extra comes with ``dev``, so this always runs."""
    from opentelemetry import trace
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    received: list[tuple[str, ExportTraceServiceRequest]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            received.append((self.path, ExportTraceServiceRequest.FromString(body)))
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv(tracing.OTLP_ENDPOINT_ENV, f"http://127.0.0.1:{server.server_port}/")
    try:
        tracing.configure_tracing("unit")
        provider = trace.get_tracer_provider()
        with (
            tracing.span("handle", TP) as outer,
            tracing.span("gateway", tracing.current()) as inner,
        ):
            pass
        assert provider.force_flush()  # type: ignore[attr-defined]  # exported, answered
        provider.shutdown()  # type: ignore[attr-defined]  # later tests export nothing
    finally:
        server.shutdown()
        server.server_close()
    assert {path for path, _ in received} == {"/v1/traces"}
    [resource] = [r for _, req in received for r in req.resource_spans]
    attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert attributes["service.name"] == "paysaga-unit"
    spans = {s.name: s for scope in resource.scope_spans for s in scope.spans}
    assert spans.keys() == {"handle", "gateway"}
    trace_id, parent_id = TP.split("-")[1:3]
    assert tracing.parse(outer) == (trace_id, spans["handle"].span_id.hex(), 1)
    assert spans["handle"].trace_id.hex() == trace_id
    assert spans["handle"].parent_span_id.hex() == parent_id
    assert spans["gateway"].parent_span_id == spans["handle"].span_id
    assert tracing.parse(inner) == (trace_id, spans["gateway"].span_id.hex(), 1)
