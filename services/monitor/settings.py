"""The stall deadlines, ``PAYSAGA_MONITOR_STALL_AFTER_S`` and its per-status overrides
``PAYSAGA_MONITOR_STALL_AFTER_<STATUS>_S``: read by the monitor and by the orders
console's "Stalled sagas" page, so both judge by one rule (``domain.Deadlines``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.monitor.domain import OPEN, Deadlines


class StallSettings(BaseSettings):
    """Deadlines in whole seconds (SagaStalled carries integers)."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    monitor_stall_after_s: int = Field(900, ge=1)
    monitor_stall_after_pending_payment_s: int | None = Field(None, ge=1)
    monitor_stall_after_payment_authorized_s: int | None = Field(None, ge=1)
    monitor_stall_after_inventory_reserved_s: int | None = Field(None, ge=1)
    monitor_stall_after_refund_pending_s: int | None = Field(None, ge=1)
    monitor_stall_after_needs_reconciliation_s: int | None = Field(None, ge=1)

    def deadlines(self) -> Deadlines:
        overrides = {
            s: v
            for s in OPEN
            if (v := getattr(self, f"monitor_stall_after_{s.value.lower()}_s")) is not None
        }
        return Deadlines(self.monitor_stall_after_s, overrides)
