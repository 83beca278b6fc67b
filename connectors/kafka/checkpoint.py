"""Checkpoints: models, drift detectors and the input offsets they have learned through.

Documents are JSON, stored under string keys: by default as the latest value per
key in a compacted state topic, or as one file per key in a directory
(`--checkpoint-dir`). Two kinds:

- `<group>/<instance>`: the instance's counters, and (without `--model-key`) its one
  model, detector and the next offset per partition (`last + 1`, as Kafka commits).
- `<group>/model/<model key>` (with `--model-key`): one keyed model and detector,
  with the next offset of each partition it has learned through.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
import urllib.parse

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors.kafka.records import OutputRecord
from connectors.kafka.settings import ConsumerSettings

__all__ = ["Checkpoint", "CheckpointError", "DirectoryStore", "ModelCheckpoint", "TopicStore", "make_store"]

logger = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A stored checkpoint that cannot be loaded."""


class PartitionOffset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, raw: bytes):
        try:
            document = cls.model_validate_json(raw)
        except ValidationError as error:
            raise CheckpointError(f"invalid checkpoint: {error}") from None
        if document.version != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint version {document.version}; this streamem reads {CHECKPOINT_VERSION}")
        return document

    def dump(self) -> bytes:
        return orjson.dumps(self.model_dump())


class Checkpoint(_Document):
    """The instance's checkpoint: counters, and its one model (None with keyed models)."""

    version: int
    key: str
    model: dict | None
    detector: dict | None
    offsets: list[PartitionOffset]
    counters: dict[str, int]
    replica: dict | None = None  # with --replicate: the replica's log position and de-duplication table


class ModelCheckpoint(_Document):
    """One keyed model: its state and the next offset of every partition it has learned through."""

    version: int
    model_key: str
    model: dict
    detector: dict
    learned_through: list[PartitionOffset]


def make_store(settings: ConsumerSettings, sink):
    if settings.checkpoint_dir is not None:
        return DirectoryStore(settings.checkpoint_dir)
    return TopicStore(settings, sink)


class DirectoryStore:
    """One file per key, replaced atomically (write, fsync, rename)."""

    def __init__(self, directory: pathlib.Path):
        self.directory = pathlib.Path(directory)

    def _path(self, key: str) -> pathlib.Path:
        return self.directory / (urllib.parse.quote(key, safe="") + ".json")

    def save_all(self, entries: list[tuple[str, bytes]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for key, value in entries:
            path = self._path(key)
            partial = path.with_suffix(".json.partial")
            with open(partial, "wb") as handle:
                handle.write(value)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)

    def load(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.exists() else None

    def load_prefix(self, prefix: str) -> dict[str, bytes]:
        if not self.directory.exists():
            return {}
        found = {}
        for path in self.directory.glob("*.json"):
            key = urllib.parse.unquote(path.name.removesuffix(".json"))
            if key.startswith(prefix):
                found[key] = path.read_bytes()
        return found


class TopicStore:
    """The latest value per key in the state topic (compacted on a real cluster).

    Tansu never compacts, and a fresh reader sees every old value anyway, so a
    load reads the topic to its end and keeps the last value per key.
    """

    def __init__(self, settings: ConsumerSettings, sink):
        self.settings = settings
        self.topic = settings.topics["state"]
        self.sink = sink

    def save_all(self, entries: list[tuple[str, bytes]]) -> None:
        self.sink.send_all([OutputRecord(self.topic, key.encode(), value) for key, value in entries])

    def load(self, key: str) -> bytes | None:
        return self.load_prefix(key).get(key)

    def load_prefix(self, prefix: str, timeout_s: float = 30.0) -> dict[str, bytes]:
        from kafka import KafkaConsumer, TopicPartition

        from connectors.kafka.clients import kafka_python_security

        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            **kafka_python_security(self.settings),
        )
        wanted = prefix.encode()
        try:
            partitions = consumer.partitions_for_topic(self.topic) or set()
            if not partitions:
                return {}
            assigned = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            latest: dict[str, bytes] = {}
            deadline = time.monotonic() + timeout_s
            while True:
                for messages in consumer.poll(timeout_ms=200).values():
                    for message in messages:
                        if message.key is not None and message.key.startswith(wanted):
                            latest[message.key.decode()] = message.value
                highs = [consumer.highwater(tp) for tp in assigned]
                if all(h is not None for h in highs) and all(
                    consumer.position(tp) >= h for tp, h in zip(assigned, highs, strict=True)
                ):
                    return latest
                if time.monotonic() > deadline:
                    raise CheckpointError(f"could not read the state topic {self.topic!r} to its end in {timeout_s}s")
        finally:
            consumer.close()
