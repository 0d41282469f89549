"""The payments service's metrics: confirmations, orders and retries by outcome, and the
unmatched payments that wait."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclasses.dataclass(frozen=True)
class Metrics:
    confirmations: Counter
    orders: Counter
    retries: Counter
    unmatched_open: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            confirmations=Counter(
                "paysaga_confirmations_total",
                "Gateway confirmations by outcome (accepted, declined, parked, matched, "
                "duplicate, rejected) and reason",
                ["outcome", "reason"],
                registry=registry,
            ),
            orders=Counter(
                "paysaga_payments_orders_total",
                "OrderPlaced records by outcome (registered, duplicate, rejected)",
                ["outcome"],
                registry=registry,
            ),
            retries=Counter(
                "paysaga_payment_retries_total",
                "PaymentRetryRequested by outcome (retry_accepted, held, rejected) and reason",
                ["outcome", "reason"],
                registry=registry,
            ),
            unmatched_open=Gauge(
                "paysaga_unmatched_payments_open",
                "Gateway payments that matched no order and wait, by state (parked, "
                "refund_pending: an operator's void or refund whose answer was lost)",
                ["state"],
                registry=registry,
            ),
        )
