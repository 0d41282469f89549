"""The refunds service: voids authorizations and refunds captured sales that the saga
cannot fulfil.

``python -m services.refunds.app``. Settings (environment, defaults):

- ``PAYSAGA_KAFKA_BOOTSTRAP_SERVERS`` (127.0.0.1:9092); ``PAYSAGA_DATABASE_URL`` or
  ``PAYSAGA_REFUNDS_DATABASE_URL`` (database ``paysaga_refunds``);
- ``PAYSAGA_REFUNDS_PORT`` (8084: /healthz, /readyz, /metrics), ``PAYSAGA_REFUNDS_HOST``;
- ``PAYSAGA_GATEWAY_URL`` (http://127.0.0.1:8090), ``PAYSAGA_GATEWAY_TIMEOUT_S`` (5),
  ``PAYSAGA_GATEWAY_MAX_ATTEMPTS`` (4 tries per call);
- worker: ``PAYSAGA_REFUNDS_MAX_ATTEMPTS`` (10 rounds), ``…_RETRY_BASE_S`` (1),
  ``…_RETRY_MAX_S`` (60), ``…_LEASE_S`` (120), ``…_POLL_S`` (0.5), ``…_CONCURRENCY`` (8);
  ``…_STALLED_RETRY_MAX_S`` (900): a void or refund whose outcome is still unknown after
  the rounds (``CompensationFailed``, once) is still looked up until the gateway settles
  it, this far apart at most.
"""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from services.refunds.handlers import HANDLERS
from services.refunds.worker import RefundsMetrics, RefundsWorker
from services.runtime.intents.service import IntentServiceSettings, SharedSettings, intent_service
from services.runtime.service import Service, run_service

NAME = "refunds"


class RefundsSettings(IntentServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PAYSAGA_REFUNDS_", extra="ignore")

    port: int = 8084


def build(settings: RefundsSettings, shared: SharedSettings) -> Service:
    return intent_service(
        NAME,
        settings,
        shared,
        HANDLERS,
        RefundsWorker,
        settings.retry_policy(),
        RefundsMetrics.create,
    )


def main() -> None:
    run_service(lambda: build(RefundsSettings(), SharedSettings()))


if __name__ == "__main__":
    main()
