"""How every paysaga Kafka client connects: the one place that turns the settings into
aiokafka options. Every producer, consumer and admin client (services, bridge, CLI,
dev tools, benchmarks) is built with ``**client_options(bootstrap)``, so a cluster that
asks for SASL_SSL + SCRAM gets it from all of them, and none is left on plaintext.
"""

from __future__ import annotations

import ssl
from typing import Any

from services.runtime.settings import KafkaSettings


def client_options(bootstrap: str, settings: KafkaSettings | None = None) -> dict[str, Any]:
    """``bootstrap_servers`` plus the security options of ``settings`` (by default read
    from the ``PAYSAGA_KAFKA_*`` environment): plaintext unless configured. TLS verifies
    the brokers' certificates and host names against ``PAYSAGA_KAFKA_SSL_CAFILE`` (or the
    system's CAs); SASL sends the configured user and password."""
    s = settings if settings is not None else KafkaSettings()
    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "security_protocol": s.kafka_security_protocol,
    }
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(cafile=s.kafka_ssl_cafile)
    if s.kafka_security_protocol.startswith("SASL_"):
        assert s.kafka_sasl_password is not None  # the settings' validator says so
        options.update(
            sasl_mechanism=s.kafka_sasl_mechanism,
            sasl_plain_username=s.kafka_sasl_username,
            sasl_plain_password=s.kafka_sasl_password.get_secret_value(),
        )
    return options
