"""The console's actions — replay or purge a dead letter, resolve an unmatched payment —
through the very functions the ``paysaga`` command runs, each recorded in the orders
audit log with the operator's name and the time.

Who may act: the holder of ``PAYSAGA_CONSOLE_TOKEN``, ``name:secret`` (a value without
a colon is a secret of operator ``console``). The name is what the audit log records.
"""

from __future__ import annotations

import dataclasses
import hmac
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.events import AuditRecorded
from services.orders import store
from services.payments.cli import ResolutionError, resolve_unmatched
from services.runtime import cli_dlq
from services.runtime.ids import new_event_id


@dataclasses.dataclass(frozen=True)
class OperatorToken:
    name: str
    secret: str

    @classmethod
    def parse(cls, raw: str | None) -> OperatorToken | None:
        if not raw:
            return None
        name, sep, secret = raw.partition(":")
        return cls(name.strip(), secret) if sep and name.strip() and secret else cls("console", raw)

    def admits(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self.secret.encode())


class Actions:
    def __init__(self, orders: AsyncEngine, bootstrap: str) -> None:
        self._orders = orders
        self._bootstrap = bootstrap

    async def dead_letter(
        self, action: cli_dlq.Action, ref: str, order_id: str | None, operator: str
    ) -> str:
        """``paysaga dlq replay|purge <ref>``."""
        n = await cli_dlq.act(self._bootstrap, action, cli_dlq.Filters(ref=ref))
        message = f"{action}: {n} dead letter(s)"
        await self._audit(f"dead_letter_{action}", operator, order_id, None, ref, message)
        return message

    async def resolve(
        self, unmatched_id: int, transaction_id: str, order_id: str | None, operator: str
    ) -> tuple[bool, str]:
        """``paysaga unmatched resolve ID --order ORDER_ID | --refund``: whether it was
        resolved, and the command's message."""
        try:
            ok, message = True, await resolve_unmatched(unmatched_id, order_id)
        except ResolutionError as exc:
            ok, message = False, f"not resolved: {exc}"
        action = "unmatched_attach" if order_id else "unmatched_refund"
        await self._audit(action, operator, order_id, transaction_id, str(unmatched_id), message)
        return ok, message

    async def _audit(
        self,
        action: str,
        operator: str,
        order_id: str | None,
        transaction_id: str | None,
        target: str,
        message: str,
    ) -> None:
        now = datetime.now(UTC)
        audit = AuditRecorded(
            subject="console",
            action=action,
            outcome="done" if not message.startswith("not resolved") else "refused",
            reason=None,
            order_id=order_id,
            transaction_id=transaction_id,
            details={"operator": operator, "target": target, "message": message[:500]},
        )
        async with self._orders.begin() as conn:
            await store.append_audit(conn, f"console-{new_event_id()}", now, audit, now)
