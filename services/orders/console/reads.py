"""Every read of the operator console across service databases: the one place where
the orders service looks at another service's tables.

Each service owns its database; the console only reads them, in read-only transactions
(``sources.py``). Nothing here writes: the console's actions go through the CLI's code
(``actions.py``). The reads of each page: ``order_list.py``, ``order_page.py``,
``operator_lists.py``, ``dead_letters.py``; what a page may show of a payload:
``scrub.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from services.orders.console.dead_letters import DeadLetterReads
from services.orders.console.operator_lists import OperatorListReads
from services.orders.console.order_list import OrderListReads
from services.orders.console.order_page import OrderPageReads


class ConsoleReads(OrderListReads, OrderPageReads, OperatorListReads, DeadLetterReads):
    """Read-only views over the five service databases, Kafka's dead-letter topics and
    the gateway: one object for every page (``routes.py``)."""


def utcnow() -> datetime:
    return datetime.now(UTC)
