"""The reads of the dead-letters page (``/console/dead-letters``): dead letters from
Kafka, each with whether it is still open in its service's database."""

from __future__ import annotations

import dataclasses

from services.orders.console.scrub import scrub
from services.orders.console.sources import Sources
from services.runtime import dlq
from services.runtime.cli_dlq import Filters, read_dead_letters, ref_of


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    ref: str
    group: str
    error_class: str
    error_message: str
    original: str
    key: str
    attempts: str
    first_failure: str
    headers: dict[str, str]
    payload: str
    #: "open", or how the service's dead_letters row was resolved
    state: str


class DeadLetterReads(Sources):
    """The dead-letters page's reads."""

    async def dead_letters(self, filters: Filters) -> list[DeadLetter]:
        """Dead letters from Kafka (as ``paysaga dlq list``), with whether each is still
        open in its service's database."""
        recs = await read_dead_letters(self._bootstrap, filters)
        states: dict[tuple[str, str, int, int], str] = {}
        for r in await self._all_services(
            'SELECT consumer_group, topic, partition, "offset", resolution, resolved_at'
            " FROM dead_letters"
        ):
            key = (r["consumer_group"], r["topic"], r["partition"], r["offset"])
            states[key] = (r["resolution"] or "resolved") if r["resolved_at"] else "open"
        out = []
        for rec in recs:
            h = dlq.header_dict(rec.headers)
            original = (h.get(dlq.H_GROUP, "?"), h.get(dlq.H_TOPIC, "?"))
            where = (*original, int(h.get(dlq.H_PARTITION, -1)), int(h.get(dlq.H_OFFSET, -1)))
            out.append(
                DeadLetter(
                    ref=ref_of(rec),
                    group=original[0],
                    error_class=h.get(dlq.H_ERROR_CLASS, "?"),
                    error_message=scrub(h.get(dlq.H_ERROR_MESSAGE, "")),
                    original=f"{where[1]}:{where[2]}:{where[3]}",
                    key=scrub(rec.key_str or ""),
                    attempts=h.get(dlq.H_ATTEMPTS, "?"),
                    first_failure=h.get(dlq.H_FIRST_FAILURE, "?"),
                    headers={k: scrub(v) for k, v in h.items()},
                    payload=scrub(rec.value),
                    state=states.get(where, "unknown"),
                )
            )
        return out
