"""The capture service: confirms sales and captures authorizations.

``python -m services.capture.app``. Settings (environment, defaults):

- ``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS`` (127.0.0.1:9092); ``PAYSAGA_DATABASE_URL`` or
  ``PAYSAGA_CAPTURE_DATABASE_URL`` (database ``paysaga_capture``);
- ``PAYSAGA_CAPTURE_PORT`` (8083: /healthz, /readyz, /metrics), ``PAYSAGA_CAPTURE_HOST``;
- ``PAYSAGA_GATEWAY_URL`` (http://127.0.0.1:8090), ``PAYSAGA_GATEWAY_TIMEOUT_S`` (5),
  ``PAYSAGA_GATEWAY_MAX_ATTEMPTS`` (4 tries per call);
- ``PAYSAGA_AUTHORIZATION_HOLD_S`` (518400 = 6 days): an authorization not captured
  by then is expired (``AuthorizationExpired``, then released and voided);
- worker: ``PAYSAGA_CAPTURE_MAX_ATTEMPTS`` (10 rounds), ``…_RETRY_BASE_S`` (1),
  ``…_RETRY_MAX_S`` (60), ``…_LEASE_S`` (120), ``…_POLL_S`` (0.5), ``…_CONCURRENCY`` (8);
  ``…_STALLED_RETRY_MAX_S`` (900): after the rounds are spent (``CaptureFailed``, once)
  the payment is still looked up until the gateway settles it, this far apart at most.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.capture import domain
from services.capture.handlers import HANDLERS
from services.capture.worker import CaptureMetrics, CaptureWorker
from services.runtime.intents.service import IntentServiceSettings, SharedSettings, intent_service
from services.runtime.service import Service, run_service

NAME = "capture"


class CaptureSettings(IntentServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_CAPTURE_", extra="ignore")

    port: int = 8083
    authorization_hold_s: float = Field(518_400.0, validation_alias="PAYSAGA_AUTHORIZATION_HOLD_S")

    def policy(self) -> domain.CapturePolicy:
        return domain.CapturePolicy(
            hold=timedelta(seconds=self.authorization_hold_s), retry=self.retry_policy()
        )


def build(settings: CaptureSettings, shared: SharedSettings) -> Service:
    return intent_service(
        NAME, settings, shared, HANDLERS, CaptureWorker, settings.policy(), CaptureMetrics.create
    )


def main() -> None:
    run_service(lambda: build(CaptureSettings(), SharedSettings()))


if __name__ == "__main__":
    main()
