"""How every Kafka client of the platform authenticates: one place turns the settings into options.

aiokafka (producers, consumers, the channel view, replay, topic admin), faust (the throughput tables) and
confluent-kafka (the access admin: SCRAM credentials and ACLs, which aiokafka's admin cannot manage) each
spell the same four facts differently: protocol, mechanism, credential, CA.
"""

from __future__ import annotations

import ssl
from typing import Any

from services.kernel.settings import Settings

PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL")


def _protocol(settings: Settings) -> str:
    protocol = settings.kafka_security_protocol.upper()
    if protocol not in PROTOCOLS:
        raise ValueError(f"BUBUH_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    return protocol


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)


def aiokafka_options(settings: Settings, credential: tuple[str, str] | None = None, *,
                     admin: bool = False) -> dict[str, Any]:
    """``bootstrap_servers`` and the security keyword arguments of an aiokafka client.

    ``credential`` overrides the settings' own (a channel's, in tests); ``admin`` picks the admin's.
    """
    options: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap}
    protocol = _protocol(settings)
    options["security_protocol"] = protocol
    if protocol == "PLAINTEXT":
        return options
    user, password = credential or settings.kafka_credential(admin=admin)
    options.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=user,
                   sasl_plain_password=password)
    if protocol == "SASL_SSL":
        options["ssl_context"] = _ssl_context(settings)
    return options


def faust_credentials(settings: Settings):
    """faust's ``broker_credentials`` (None: plaintext)."""
    import faust

    protocol = _protocol(settings)
    if protocol == "PLAINTEXT":
        return None
    user, password = settings.kafka_credential()
    return faust.SASLCredentials(username=user, password=password, mechanism=settings.kafka_sasl_mechanism,
                                 ssl_context=_ssl_context(settings) if protocol == "SASL_SSL" else None)


def confluent_config(settings: Settings, credential: tuple[str, str] | None = None, *,
                     admin: bool = False) -> dict[str, str]:
    """librdkafka's configuration (confluent-kafka) for the same broker and credential."""
    config = {"bootstrap.servers": settings.kafka_bootstrap, "security.protocol": _protocol(settings)}
    if config["security.protocol"] == "PLAINTEXT":
        return config
    user, password = credential or settings.kafka_credential(admin=admin)
    config.update({"sasl.mechanism": settings.kafka_sasl_mechanism, "sasl.username": user,
                   "sasl.password": password})
    if config["security.protocol"] == "SASL_SSL" and settings.kafka_ssl_cafile:
        config["ssl.ca.location"] = settings.kafka_ssl_cafile
    return config


def java_properties(settings: Settings, credential: tuple[str, str] | None = None) -> dict[str, str]:
    """The Java client's properties (tests' Java producer, a channel's own client)."""
    props = {"bootstrap.servers": settings.kafka_bootstrap, "security.protocol": _protocol(settings)}
    if props["security.protocol"] == "PLAINTEXT":
        return props
    user, password = credential or settings.kafka_credential()
    module = ("org.apache.kafka.common.security.scram.ScramLoginModule"
              if settings.kafka_sasl_mechanism.startswith("SCRAM") else
              "org.apache.kafka.common.security.plain.PlainLoginModule")
    props.update({"sasl.mechanism": settings.kafka_sasl_mechanism,
                  "sasl.jaas.config": f'{module} required username="{user}" password="{password}";'})
    if props["security.protocol"] == "SASL_SSL" and settings.kafka_ssl_cafile:
        props.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": settings.kafka_ssl_cafile})
    return props
