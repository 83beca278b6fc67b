"""Create the output topics the consumer writes to, if they are missing."""

from __future__ import annotations

import logging

from connectors.kafka.settings import ConsumerSettings

__all__ = ["ensure_topics"]

logger = logging.getLogger(__name__)


def ensure_topics(settings: ConsumerSettings, input_partitions: int | None = None) -> None:
    """Create missing topics: the input (when `input_partitions` is given), the outputs and the
    compacted state topic. Assignments get as many partitions as the input, so keys keep their
    partition's order downstream."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from connectors.kafka.clients import kafka_python_security

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **kafka_python_security(settings))
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
