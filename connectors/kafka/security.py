"""The consumer's security settings (TLS, SASL) in each Kafka client's own option names."""

from __future__ import annotations

from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["confluent_security", "kafka_python_security"]


def kafka_python_security(settings: ConsumerSettings) -> dict:
    """Security settings in kafka-python's names (only those that are set)."""
    options = {"security_protocol": settings.security_protocol}
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
    if settings.sasl_username:
        options["sasl_plain_username"] = settings.sasl_username
    if settings.sasl_password:
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(settings, name):
            options[name] = str(getattr(settings, name))
    return options


def confluent_security(settings: ConsumerSettings) -> dict:
    options = {"security.protocol": settings.security_protocol}
    names = {
        "sasl_mechanism": "sasl.mechanisms",
        "sasl_username": "sasl.username",
        "ssl_cafile": "ssl.ca.location",
        "ssl_certfile": "ssl.certificate.location",
        "ssl_keyfile": "ssl.key.location",
    }
    for ours, theirs in names.items():
        if getattr(settings, ours):
            options[theirs] = str(getattr(settings, ours))
    if settings.sasl_password:
        options["sasl.password"] = settings.sasl_password.get_secret_value()
    return options
