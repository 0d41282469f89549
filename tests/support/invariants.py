"""The one invariant check of the chaos scenarios (tests/chaos/).

``paysaga reconcile --gateway`` (services/reconcile/) checks docs/contract.md §3.1 across
every store and the gateway's ledger; this calls its ``check`` and adds what reconcile
cannot know, because only the scenario knows what it sent:

* every order is final, in a status its path allows, or explainably pending (no
  payment was sent for it);
* every input is accounted for: each order processed (in the projection), rejected
  with a reason (audit) or dead-lettered; each confirmation stored (accepted, declined
  or rejected), parked as unmatched, rejected with a reason or dead-lettered; each
  poison record dead-lettered or rejected with a reason — counted, none missing;
* exactly one customer notification per outcome: the kinds on
  ``customer.notifications.v1`` are those of the order's status history, once each
  (one event_id each: a record the relay sent again is the same notification);
* no card number (Luhn) or card-data key in any store, service log, topic written by
  paysaga or dead letter (``schemas.carddata`` is the finder).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.carddata import (
    CARD_NUMBER_PRESENT,
    contains_pan,
    find_card_data,
    find_card_data_in_bytes,
    redact,
)
from schemas.events import AUDIT_IDENTIFIERS
from services import reconcile
from services.devclient import DevClient
from services.runtime import tracing
from services.runtime.settings import SERVICES
from services.runtime.topics import load_specs, partitions_of

NOTIFICATIONS = "customer.notifications.v1"
FINAL = frozenset({"PAID_CONFIRMED", "PAYMENT_FAILED", "REFUNDED", "NEEDS_RECONCILIATION"})
#: topics the scenario itself writes as the checkout / catalog (a poison record with a
#: card number is the producer's fault; what paysaga writes from it is scanned)
INPUT_TOPICS = ("checkout.orders.v1", "catalog.stock.v1")
#: row fields that hold a number that is no card's: record timestamps, and the audit's
#: fields that hold an identifier under another name (a record's key: an order id)
NUMERIC_FIELDS = ("timestamp_ms", *AUDIT_IDENTIFIERS)
#: headers whose all-digit value is a record's coordinates or time, not a card's number
NUMERIC_HEADERS = ("timestamp", "offset", "partition", "-ts", "_ms")


def _scanned_headers(headers: Iterable[tuple[str, bytes | str | None]]) -> list[bytes]:
    """The header values a card scan reads: not a record's coordinates or time, and not a
    well-formed W3C traceparent (random hex ids, now and then all digits and Luhn-valid)."""
    out = []
    for k, v in headers:
        raw = v.encode() if isinstance(v, str) else v
        if not raw or (k.endswith(NUMERIC_HEADERS) and raw.isdigit()):
            continue
        if k == tracing.TRACEPARENT and tracing.parse(raw) is not None:
            continue
        out.append(raw)
    return out


def _scanned_value(value: bytes) -> bytes:
    """A record value as a card scan reads it: a JSON value without its well-formed
    ``traceparent`` fields (random hex ids, as in a header: the monitor's table keeps the
    trace of each order's last status); anything else as it is."""
    try:
        doc = json.loads(value)
    except ValueError:
        return value

    def drop(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: drop(v)
                for k, v in node.items()
                if not (k == tracing.TRACEPARENT and isinstance(v, str) and tracing.parse(v))
            }
        if isinstance(node, list):
            return [drop(v) for v in node]
        return node

    return json.dumps(drop(doc)).encode() if isinstance(doc, dict | list) else value


@dataclasses.dataclass
class Inputs:
    """What a scenario sent and what each order may end as."""

    #: order id -> the statuses its path allows at the end
    orders: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    #: reconcile rules an order's path produces by design (a refund the gateway declines)
    expected_violations: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    #: orders no payment was sent for: PENDING_PAYMENT is their explained end
    unpaid: set[str] = dataclasses.field(default_factory=set)
    #: gateway transaction id -> order id, for every confirmation the gateway sent
    confirmations: dict[str, str] = dataclasses.field(default_factory=dict)
    #: poison records: (topic, partition, offset)
    poison: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    #: topic scans look at records from this time on (ms)
    since_ms: int = 0
    #: log file name -> its size when the scenario began: the scan reads what follows
    log_offsets: dict[str, int] = dataclasses.field(default_factory=dict)
    #: order id -> the transaction of the customer's retry (its second payment)
    retries: dict[str, str] = dataclasses.field(default_factory=dict)
    #: a fault may flag a failed attempt (its void unknown, NEEDS_RECONCILIATION) while
    #: its retry comes in: payments then refuses the retry (retry_not_allowed_in_status)
    #: and parks its payment unmatched, and the order ends PAYMENT_FAILED once the void
    #: is found — explained, if both are so (``_refused_retry``)
    retry_may_be_refused: bool = False


@dataclasses.dataclass
class Report:
    violations: list[str]
    counts: Counter[str]


def _db(client: DevClient, service: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return client.db(service, sql, *params)


def statuses(client: DevClient, order_ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    rows = _db(
        client,
        "orders",
        "SELECT order_id, status, reason FROM orders WHERE order_id = ANY(%s)",
        list(order_ids),
    )
    return {r[0]: (r[1], r[2]) for r in rows}


def open_work(client: DevClient) -> int:
    """Outbox rows not yet published, and gateway intents not yet settled."""
    n = 0
    for service in SERVICES:
        n += _db(
            client, service, "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND dead_at IS NULL"
        )[0][0]
    n += _db(
        client,
        "capture",
        "SELECT count(*) FROM captures WHERE state IN ('pending', 'in_flight', 'unknown')",
    )[0][0]
    n += _db(
        client,
        "refunds",
        "SELECT count(*) FROM compensations WHERE state IN ('pending', 'in_flight', 'unknown')",
    )[0][0]
    return int(n)


def _refused_retry(client: DevClient, inputs: Inputs, order_id: str, status: str | None) -> bool:
    """A PAYMENT_FAILED order whose retry payments refused with its reason audited, and
    whose retry's payment is parked unmatched (held, not taken: an operator's to settle),
    where the scenario allows it (``Inputs.retry_may_be_refused``)."""
    txn = inputs.retries.get(order_id)
    if not (inputs.retry_may_be_refused and status == "PAYMENT_FAILED" and txn):
        return False
    refused = ("payment_retry", "retry_not_allowed_in_status", None)
    parked = _db(
        client,
        "payments",
        "SELECT 1 FROM unmatched_payments WHERE transaction_id = %s AND state = 'parked'",
        txn,
    )
    return refused in _rejections(client, order_id) and bool(parked)


def settled(client: DevClient, inputs: Inputs) -> bool:
    """Every order where it may end, nothing left to publish or to call."""
    seen = statuses(client, inputs.orders)
    for order_id, allowed in inputs.orders.items():
        status = seen.get(order_id, (None, None))[0]
        if (
            status not in allowed
            and not (order_id in inputs.unpaid and status == "PENDING_PAYMENT")
            and not _refused_retry(client, inputs, order_id, status)
        ):
            return False
    return open_work(client) == 0 and not _missing_inputs(client, inputs)


def check(client: DevClient, inputs: Inputs, log_dir: Path | None = None) -> Report:
    counts: Counter[str] = Counter()
    out: list[str] = []
    order_ids = list(inputs.orders)
    # 1. docs/contract.md §3.1 across every store and the gateway ledger: reconcile's own rules
    found = reconcile.check(client.url("gatewaysim"), order_ids) if order_ids else []
    expected = {(o, r) for o, rules in inputs.expected_violations.items() for r in rules}
    met: set[tuple[str, str]] = set()
    for v in found:
        hit = next(
            ((o, v.rule) for o, r in expected if r == v.rule and o in f"{v.subject} {v.detail}"),
            None,
        )
        if hit:
            met.add(hit)
        else:
            out.append(f"reconcile {v.rule}: {v.subject}: {v.detail}")
    out += [
        f"reconcile {r} expected for {o} (its path's by design), not reported"
        for o, r in expected - met
    ]
    counts["reconcile findings (expected)"] = len(met)

    # 2. every order final in a status its path allows, or explainably pending
    seen = statuses(client, order_ids)
    for order_id, allowed in inputs.orders.items():
        status, reason = seen.get(order_id, (None, None))
        if status in allowed:
            counts[f"final {status}"] += 1
        elif order_id in inputs.unpaid and status == "PENDING_PAYMENT":
            counts["pending (unpaid)"] += 1
        elif _refused_retry(client, inputs, order_id, status):
            counts["final PAYMENT_FAILED (retry refused while flagged, its payment unmatched)"] += 1
        elif status is not None:
            out.append(
                f"order {order_id}: {status} ({reason}), its path ends in {sorted(allowed)};"
                f" its rejections: {_rejections(client, order_id)}"
            )

    # 3. every input accounted for
    missing = _missing_inputs(client, inputs, counts)
    out += missing

    # 4. exactly one notification per outcome
    out += _notification_rule(client, inputs, counts)

    # 5. no card number anywhere
    out += _card_scan(client, inputs, log_dir, counts)
    return Report(out, counts)


def _rejections(client: DevClient, order_id: str) -> list[tuple[Any, ...]]:
    """An order's rejected inputs (audit): the evidence of an unexpected end."""
    return _db(
        client,
        "orders",
        "SELECT action, reason, transaction_id FROM audit_log"
        " WHERE order_id = %s AND outcome = 'rejected' ORDER BY id",
        order_id,
    )


def _missing_inputs(
    client: DevClient, inputs: Inputs, counts: Counter[str] | None = None
) -> list[str]:
    counts = counts if counts is not None else Counter()
    out: list[str] = []
    order_ids = list(inputs.orders)
    projected = {
        r[0]
        for r in _db(
            client, "orders", "SELECT order_id FROM orders WHERE order_id = ANY(%s)", order_ids
        )
    }
    audited = {
        r[0]
        for r in _db(
            client,
            "orders",
            "SELECT order_id FROM audit_log WHERE outcome = 'rejected'"
            " AND reason IS NOT NULL AND order_id = ANY(%s)",
            order_ids,
        )
    }
    dead = {
        r[0]: r[1]
        for service in SERVICES
        for r in _db(
            client,
            service,
            "SELECT order_key, error_class FROM dead_letters WHERE order_key = ANY(%s)",
            order_ids,
        )
    }
    for order_id in order_ids:
        if order_id in projected:
            counts["orders processed"] += 1
        elif order_id in audited:
            counts["orders rejected"] += 1
        elif order_id in dead:
            counts["orders dead-lettered"] += 1
        else:
            out.append(f"order {order_id}: sent, but not processed, rejected nor dead-lettered")
    txns = list(inputs.confirmations)
    stored = {
        r[0]
        for r in _db(
            client,
            "payments",
            "SELECT transaction_id FROM confirmations WHERE transaction_id = ANY(%s)",
            txns,
        )
    }
    unmatched = {
        r[0]
        for r in _db(
            client,
            "payments",
            "SELECT transaction_id FROM unmatched_payments WHERE transaction_id = ANY(%s)",
            txns,
        )
    }
    rejected = {
        r[0]
        for r in _db(
            client,
            "orders",
            "SELECT transaction_id FROM audit_log WHERE outcome = 'rejected'"
            " AND reason IS NOT NULL AND transaction_id = ANY(%s)",
            txns,
        )
    }
    for txn, order_id in inputs.confirmations.items():
        if txn in stored:
            counts["confirmations stored"] += 1
        elif txn in unmatched:
            counts["confirmations unmatched"] += 1
        elif txn in rejected:
            counts["confirmations rejected"] += 1
        elif order_id in dead:
            counts["confirmations dead-lettered"] += 1
        else:
            out.append(
                f"confirmation {txn} (order {order_id}): sent, but not stored, parked,"
                " rejected nor dead-lettered"
            )
    if inputs.poison:
        refs = [f"{t}/{p}/{o}" for t, p, o in inputs.poison]
        lettered = {
            f"{r[0]}/{r[1]}/{r[2]}": r[3]
            for service in SERVICES
            for r in _db(
                client,
                service,
                'SELECT topic, partition, "offset", error_message FROM dead_letters',
            )
        }
        audited_refs = {
            r[0]: r[1]
            for r in _db(
                client,
                "orders",
                "SELECT details->>'record', reason FROM audit_log"
                " WHERE details->>'record' = ANY(%s)",
                refs,
            )
        }
        for ref in refs:
            if lettered.get(ref):
                counts["poison dead-lettered"] += 1
            elif audited_refs.get(ref):
                counts["poison rejected"] += 1
            else:
                out.append(f"poison record {ref}: neither dead-lettered nor rejected with a reason")
    return out


def _notification_kind(status: str, reason: str | None) -> str | None:
    from services.orders.domain import _notification_kind as kind

    return kind(status, reason)  # type: ignore[arg-type]


def _notification_rule(client: DevClient, inputs: Inputs, counts: Counter[str]) -> list[str]:
    history: dict[str, Counter[str]] = defaultdict(Counter)
    for order_id, status, reason in _db(
        client,
        "orders",
        "SELECT order_id, status, reason FROM order_history WHERE order_id = ANY(%s)",
        list(inputs.orders),
    ):
        if (kind := _notification_kind(status, reason)) is not None:
            history[order_id][kind] += 1
    # the relay publishes at least once (a crash or outage between Kafka's ack and
    # marking the row sent sends the row again): a consumer dedupes by event_id, the
    # envelope's dedupe key (docs/contract.md §1), so one notification is one event_id
    events: dict[str, dict[str, str]] = defaultdict(dict)
    for m in asyncio.run(records_since(client.bootstrap, [NOTIFICATIONS], inputs.since_ms)):
        key = m.key.decode() if m.key else ""
        if key in inputs.orders:
            record = json.loads(m.value)
            if record["event_id"] in events[key]:
                counts["notifications redelivered (same event_id)"] += 1
            events[key][record["event_id"]] = record["payload"]["kind"]
    sent: defaultdict[str, Counter[str]] = defaultdict(
        Counter, {order_id: Counter(kinds.values()) for order_id, kinds in events.items()}
    )
    out = []
    for order_id in inputs.orders:
        if sent[order_id] != history[order_id]:
            out.append(
                f"order {order_id}: notifications {dict(sent[order_id])},"
                f" its outcomes {dict(history[order_id])}"
            )
        counts["notifications"] += sum(sent[order_id].values())
    return out


def _scan_value(value: object) -> str | None:
    """A stored row (as JSON): bytea columns hold whole records, scanned as bytes — but
    for a record's key (``key``, ``*_key``): an order id or a sku, an identifier, which
    may be all digits and Luhn-valid (docs/contract.md §2.2)."""
    if isinstance(value, dict):
        rest = {}
        for name, v in value.items():
            raw = None
            if isinstance(v, str) and v.startswith("\\x"):
                with contextlib.suppress(ValueError):
                    raw = bytes.fromhex(v[2:])
            if name == "headers" and isinstance(v, list):
                parts = _scanned_headers((str(h[0]), h[1]) for h in v if len(h) == 2)
                if any(find_card_data_in_bytes(p) is not None for p in parts):
                    return CARD_NUMBER_PRESENT
            elif name == tracing.TRACEPARENT and isinstance(v, str) and tracing.parse(v):
                continue  # an intent's stored trace context: random hex ids
            elif raw is None:
                rest[name] = v
            elif not (name == "key" or name.endswith("_key")) and (
                found := find_card_data_in_bytes(raw)
            ):
                return found
        # the hex text of a bytea column is no number: its digit runs are not scanned
        value = rest
    return find_card_data(value, identifiers=NUMERIC_FIELDS)


def _card_scan(
    client: DevClient, inputs: Inputs, log_dir: Path | None, counts: Counter[str]
) -> list[str]:
    out: list[str] = []
    for service in SERVICES:
        tables = [
            r[0]
            for r in _db(
                client, service, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        ]
        for table in tables:
            for (row,) in _db(client, service, f'SELECT row_to_json(t) FROM "{table}" t'):  # noqa: S608
                counts["rows scanned"] += 1
                if _scan_value(row) == CARD_NUMBER_PRESENT:
                    out.append(f"card number in {service}.{table}: {_short(row)}")
    topics = [spec.name for spec in load_specs() if spec.name not in INPUT_TOPICS]
    for m in asyncio.run(records_since(client.bootstrap, topics, inputs.since_ms)):
        counts["records scanned"] += 1
        parts = [_scanned_value(m.value or b""), *_scanned_headers(m.headers)]
        if any(find_card_data_in_bytes(p) == CARD_NUMBER_PRESENT for p in parts):
            out.append(f"card number on {m.topic} {m.partition}:{m.offset}")
    if log_dir is not None:
        for log in sorted(log_dir.glob("*.log")):
            with log.open("rb") as f:
                f.seek(inputs.log_offsets.get(log.name, 0))
                lines = f.read().decode(errors="replace").splitlines()
            for n, line in enumerate(lines, 1):
                if contains_pan(line):
                    out.append(f"card number in {log.name} (+{n}): {redact(line).text[:200]}")
            counts["logs scanned"] += 1
    return out


async def records_since(bootstrap: str, topics: list[str], since_ms: int) -> list[Any]:
    """Every record of ``topics`` from ``since_ms`` up to their end offsets now: one
    consumer, each partition sought by time."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await partitions_of(bootstrap, names=topics)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        todo = []
        for tp in tps:
            at = starts.get(tp)
            if at is None or at.offset >= ends[tp]:
                continue  # nothing written since
            consumer.seek(tp, at.offset)
            todo.append(tp)
        out: list[Any] = []
        while todo and not all([await consumer.position(tp) >= ends[tp] for tp in todo]):
            for msgs in (await consumer.getmany(*todo, timeout_ms=500)).values():
                out.extend(m for m in msgs if m.offset < ends[TopicPartition(m.topic, m.partition)])
        return out
    finally:
        await consumer.stop()


def _short(row: object) -> str:
    """A finding's context, itself redacted: a report must not repeat the number."""
    text = redact(json.dumps(row)).text
    return text if len(text) < 300 else text[:300] + "…"
