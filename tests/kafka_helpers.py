"""Helpers for tests on the embedded broker: produce, read a topic to its end, wait on conditions."""

from __future__ import annotations

import json
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None] | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    keys = keys or [None] * len(values)
    futures = [producer.send(topic, key=k, value=v) for k, v in zip(keys, values, strict=True)]
    producer.flush()
    producer.close()
    assert all(f.succeeded() for f in futures), "the broker did not acknowledge every test record"


def read_all(bootstrap: str, topic: str, timeout_s: float = 20.0) -> list:
    """Every message of every partition of `topic`, read up to the high watermarks (as JSON or raw)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        assigned = [TopicPartition(topic, p) for p in partitions]
        if not assigned:
            return []
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        out = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=200).values():
                out.extend(messages)
            highs = [consumer.highwater(tp) for tp in assigned]
            if all(h is not None and consumer.position(tp) >= h for tp, h in zip(assigned, highs, strict=True)):
                return [_decode(m.value) for m in out]
        raise TimeoutError(f"could not read {topic} to its end within {timeout_s}s")
    finally:
        consumer.close()


def _decode(value: bytes):
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


class AnsweredOffsets:
    """The (partition, offset) pairs answered on an assignments topic, re-read on each `reached` (for
    `wait_for` while consumers still write to it)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.offsets: set[tuple[int, int]] = set()

    def reached(self, total: int) -> bool:
        try:
            records = read_all(self.bootstrap, self.topic)
        except TimeoutError:  # the topic grew faster than one read caught up with it: ask again
            return False
        self.offsets.update((r["source"]["partition"], r["source"]["offset"]) for r in records)
        return len(self.offsets) >= total


def wait_for(condition, timeout_s: float, what: str):
    """Re-evaluate `condition` (which itself blocks briefly, e.g. on a poll) until it holds or time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class TopicCounter:
    """Counts a topic's messages as they arrive; `count()` blocks up to 200 ms on a poll."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        partitions = self.consumer.partitions_for_topic(topic) or {0}
        assigned = [TopicPartition(topic, p) for p in partitions]
        self.consumer.assign(assigned)
        # from the start: Tansu answers "latest" with the last batch's base offset + 1, not the end of the
        # partition, and records may predate this counter
        self.consumer.seek_to_beginning(*assigned)
        self.seen = 0

    def count(self) -> int:
        for messages in self.consumer.poll(timeout_ms=200).values():
            self.seen += len(messages)
        return self.seen

    def close(self) -> None:
        self.consumer.close()
