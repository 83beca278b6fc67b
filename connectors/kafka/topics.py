"""Create the output topics the consumer writes to, if they are missing.

This is the consumer's first contact with the cluster, so it is also where an unreachable
cluster is reported: in one line, after `connect_timeout_s`.
"""

from __future__ import annotations

import contextlib
import logging

from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["BrokerUnreachable", "connect_timeout_options", "ensure_topics", "silent_client"]

logger = logging.getLogger(__name__)


class BrokerUnreachable(RuntimeError):
    """No bootstrap server answered within `connect_timeout_s`."""

    @classmethod
    def of(cls, settings: ConsumerSettings, error: BaseException) -> BrokerUnreachable:
        """The one-line report of `error` from a client that could not reach the bootstrap servers."""
        return cls(
            f"cannot reach the Kafka bootstrap servers {settings.bootstrap_servers} within "
            f"{settings.connect_timeout_s:g} s ({type(error).__name__}); is the broker up, and the address right?"
        )


@contextlib.contextmanager
def silent_client():
    """kafka-python logs every refused connection at ERROR while it bootstraps; the caller says it in one line
    instead. Only --log-level DEBUG keeps those lines."""
    client = logging.getLogger("kafka")
    previous = client.level
    if client.getEffectiveLevel() > logging.DEBUG:
        client.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        client.setLevel(previous)


def connect_timeout_options(client_type, settings: ConsumerSettings) -> dict:
    """The option that bounds a kafka-python client's bootstrap by `connect_timeout_s` (its name differs
    between kafka-python 3 and 2)."""
    for name in ("bootstrap_timeout_ms", "api_version_auto_timeout_ms"):
        if name in client_type.DEFAULT_CONFIG:
            return {name: int(settings.connect_timeout_s * 1000)}
    return {}


def _admin(settings: ConsumerSettings):
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    from streamem_connectors.kafka.security import kafka_python_security

    options = kafka_python_security(settings)
    options.update(connect_timeout_options(KafkaAdminClient, settings))
    with silent_client():
        try:
            return KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **options)
        except KafkaError as error:
            raise BrokerUnreachable.of(settings, error) from None


def ensure_topics(settings: ConsumerSettings, input_partitions: int | None = None) -> None:
    """Create missing topics: the input (when `input_partitions` is given), the outputs and the
    compacted state topic. Assignments get as many partitions as the input, so keys keep their
    partition's order downstream. Raises `BrokerUnreachable` when no bootstrap server answers."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = _admin(settings)
    try:
        existing = set(admin.list_topics())
        if settings.input_topic not in existing and input_partitions is None:
            logger.warning("input topic %s does not exist yet; waiting for it", settings.input_topic)
        partitions = input_partitions or 1
        if settings.input_topic in existing:
            described = admin.describe_topics([settings.input_topic])
            partitions = max(1, len(described[0].get("partitions", []))) if described else partitions
        topics = settings.topics
        wanted = {
            topics["assignments"]: (partitions, {}),
            topics["drift"]: (1, {}),
            topics["dead_letter"]: (1, {}),
            topics["state"]: (1, {"cleanup.policy": "compact"}),
        }
        if settings.replicate:  # the replicated log: one partition, so every replica reads one order
            wanted[topics["statistics"]] = (1, {})
        if input_partitions is not None:
            wanted[settings.input_topic] = (input_partitions, {})
        missing = [
            NewTopic(name, count, 1, topic_configs=configs)
            for name, (count, configs) in wanted.items()
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
            logger.info("created topics %s", [t.name for t in missing])
    finally:
        admin.close()
