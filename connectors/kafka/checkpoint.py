"""Checkpoints: the model, the drift detector and the input offsets they have learned up to.

Stored as one JSON document per consumer instance, keyed `<group>/<instance>`:
by default the latest value under that key in a compacted state topic, or a
file in a directory (`--checkpoint-dir`). The offsets are stored as the next
offset to read (`last + 1`), as Kafka commits them.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.kafka.records import OutputRecord
from connectors.kafka.settings import ConsumerSettings

__all__ = ["Checkpoint", "CheckpointError", "DirectoryStore", "TopicStore", "make_store"]

logger = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A stored checkpoint that cannot be loaded."""


class PartitionOffset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class Checkpoint(BaseModel):
    """What a restart needs: the model, the detector and the next offset per partition."""

    model_config = ConfigDict(extra="forbid")
    version: int
    key: str
    model: dict
    detector: dict
    offsets: list[PartitionOffset]
    counters: dict[str, int]

    @classmethod
    def parse(cls, raw: bytes) -> Checkpoint:
        try:
            document = cls.model_validate_json(raw)
        except ValidationError as error:
            raise CheckpointError(f"invalid checkpoint: {error}") from None
        if document.version != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint version {document.version}; this streamem reads {CHECKPOINT_VERSION}")
        return document


def make_store(settings: ConsumerSettings, sink):
    if settings.checkpoint_dir is not None:
        return DirectoryStore(settings.checkpoint_dir, settings.checkpoint_key)
    return TopicStore(settings, sink)


class DirectoryStore:
    """One file per key, replaced atomically (write, fsync, rename)."""

    def __init__(self, directory: pathlib.Path, key: str):
        self.path = pathlib.Path(directory) / (key.replace("/", "__") + ".json")

    def load(self) -> Checkpoint | None:
        if not self.path.exists():
            return None
        return Checkpoint.parse(self.path.read_bytes())

    def save(self, checkpoint: Checkpoint) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        with open(partial, "wb") as handle:
            handle.write(orjson.dumps(checkpoint.model_dump()))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.path)


class TopicStore:
    """The latest checkpoint under our key in the state topic (compacted on a real cluster).

    Tansu never compacts, and a fresh reader sees every old value anyway, so
    `load` reads the topic to its end and keeps the last value for our key.
    """

    def __init__(self, settings: ConsumerSettings, sink):
        self.settings = settings
        self.topic = settings.topics["state"]
        self.key = settings.checkpoint_key.encode()
        self.sink = sink

    def save(self, checkpoint: Checkpoint) -> None:
        self.sink.send_all([OutputRecord(self.topic, self.key, orjson.dumps(checkpoint.model_dump()))])

    def load(self, timeout_s: float = 30.0) -> Checkpoint | None:
        from kafka import KafkaConsumer, TopicPartition

        from connectors.kafka.clients import kafka_python_security

        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            **kafka_python_security(self.settings),
        )
        try:
            partitions = consumer.partitions_for_topic(self.topic) or set()
            if not partitions:
                return None
            assigned = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            latest: bytes | None = None
            deadline = time.monotonic() + timeout_s
            while True:
                for messages in consumer.poll(timeout_ms=200).values():
                    for message in messages:
                        if message.key == self.key:
                            latest = message.value
                highs = [consumer.highwater(tp) for tp in assigned]
                if all(h is not None for h in highs) and all(
                    consumer.position(tp) >= h for tp, h in zip(assigned, highs)
                ):
                    break
                if time.monotonic() > deadline:
                    raise CheckpointError(f"could not read the state topic {self.topic!r} to its end in {timeout_s}s")
            return None if latest is None else Checkpoint.parse(latest)
        finally:
            consumer.close()
