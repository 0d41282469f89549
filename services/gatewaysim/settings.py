"""The simulator's settings (``PAYSAGA_*``)."""

from __future__ import annotations

import json

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.settings import LOCAL_DEV_GATEWAY_SECRETS


class GatewaySimSettings(BaseSettings):
    """``PAYSAGA_*`` settings of the simulator. Unlike the services, the simulator may
    default ``PAYSAGA_GATEWAY_SECRETS`` to the documented local development secret."""

    model_config = SettingsConfigDict(env_prefix="PAYSAGA_", extra="ignore")

    gatewaysim_host: str = "127.0.0.1"
    gatewaysim_port: int = 8090
    gateway_id: str = "simgw"
    gateway_secrets: dict[str, list[str]] = Field(
        default_factory=lambda: json.loads(LOCAL_DEV_GATEWAY_SECRETS)
    )
    bridge_url: str = "http://127.0.0.1:8070"
    lost_response_delay_s: float = 30.0
    slow_delay_s: float = 2.0
    flaky_failures: int = 2
    delivery_timeout_s: float = 5.0
    delivery_backoff_base_s: float = 0.5
    delivery_backoff_max_s: float = 15.0
    #: None: retry delivery until the bridge answers 2xx (docs/contract.md §4)
    delivery_give_up_s: float | None = None

    @model_validator(mode="after")
    def _can_sign(self) -> GatewaySimSettings:
        if not (self.gateway_secrets.get(self.gateway_id) or [""])[0]:
            raise ValueError(f"PAYSAGA_GATEWAY_SECRETS has no secret for {self.gateway_id!r}")
        return self
