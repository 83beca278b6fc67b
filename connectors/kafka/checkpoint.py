"""Checkpoints: models, drift detectors and the input offsets they have learned through.

Documents are JSON, stored under string keys: by default as the latest value per
key in a compacted state topic, or as one file per key in a directory
(`--checkpoint-dir`). Two kinds:

- `<group>/<instance>`: the instance's counters, and (without `--model-key`) its one
  model, detector and the next offset per partition (`last + 1`, as Kafka commits).
- `<group>/model/<model key>` (with `--model-key`): one keyed model and detector,
  with the next offset of each partition it has learned through.

Each document also records the model settings it was written with (`MODEL_SETTINGS`).
Whether a consumer may resume from what it finds here is decided in
`streamem_connectors.kafka.resume`; this module only stores, parses and restores. Every error
names where the checkpoint is (file, or state topic and key) and the field.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import time
import urllib.parse
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from streamem.state import Count
from streamem_connectors.kafka.records import OutputRecord
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = [
    "MODEL_SETTINGS",
    "Checkpoint",
    "CheckpointError",
    "DirectoryStore",
    "ModelCheckpoint",
    "TopicStore",
    "is_warm_state",
    "make_store",
    "model_checkpoint",
    "model_settings",
]

logger = logging.getLogger(__name__)
CHECKPOINT_VERSION = 1

# The settings that make the model what it is: a checkpoint records them, and one written with other
# values is refused on resume (see streamem_connectors.kafka.resume for which differences count). Everything
# else (drift_every, checkpoint cadence, polling, client, output topics, logging, security) may change
# from one run to the next.
MODEL_SETTINGS = (
    "model",
    "features",
    "target",
    "model_key",
    "replicate",
    "n_components",
    "covariance_type",
    "batch_size",
    "warmup",
    "step_alpha",
    "step_floor",
    "seed",
)


class CheckpointError(ValueError):
    """A stored checkpoint that cannot be loaded, or that this consumer refuses to resume from."""


def model_settings(settings: ConsumerSettings) -> dict[str, Any]:
    """The model settings of these flags, as JSON values (what a checkpoint records)."""
    return orjson.loads(orjson.dumps({name: getattr(settings, name) for name in MODEL_SETTINGS}))


class PartitionOffset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topic: str
    partition: int = Field(ge=0, lt=2**31)
    offset: Count


class CountersDocument(BaseModel):
    """Exactly the consumer's counters: a missing or extra one is an error."""

    model_config = ConfigDict(extra="forbid")
    records_in: Count
    assigned: Count
    dead_lettered: Count
    drift_events: Count


class DetectorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_components: int = Field(ge=2)
    half_lives: list[float]
    reference_size: int
    grace: int
    false_alarm: float


class DetectorDocument(BaseModel):
    """`WeightDriftDetector.to_dict()`; its shapes are checked by `from_dict`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    params: DetectorParams
    short: list[list[float]]
    reference: list[float]
    since_anchor: Count
    seen: Count
    n_detections: Count


def _once_per_partition(offsets: list[PartitionOffset]) -> list[PartitionOffset]:
    """A partition listed twice would resume from whichever entry came last (records learned again)."""
    seen = set()
    for entry in offsets:
        if (entry.topic, entry.partition) in seen:
            raise ValueError(f"partition {entry.topic}[{entry.partition}] is listed twice")
        seen.add((entry.topic, entry.partition))
    return offsets


Offsets = Annotated[list[PartitionOffset], AfterValidator(_once_per_partition)]


def _field(location: tuple) -> str:
    return ".".join(str(part) for part in location)


def describe(error: ValidationError, under: str | None = None) -> str:
    """A pydantic error as one line naming each field: "field 'detector.params' is missing"."""
    parts = []
    for item in error.errors():
        where = _field((under, *item["loc"]) if under else item["loc"])
        if item["type"] == "missing":
            parts.append(f"field {where!r} is missing")
        elif item["type"] == "extra_forbidden":
            parts.append(f"field {where!r} is not expected")
        elif item["type"] == "json_invalid":
            parts.append(f"not valid JSON ({item['msg']})")
        elif not where:
            parts.append(item["msg"])
        else:  # a validator's own message, without pydantic's "Value error, " in front
            parts.append(f"field {where!r}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, raw: bytes, where: str = "(unnamed)"):
        """Validate a stored document; `where` (the store's name for it) starts every error message."""
        try:
            document = cls.model_validate_json(raw)
        except ValidationError as error:
            raise CheckpointError(f"checkpoint {where}: {describe(error)}") from None
        if document.version != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"checkpoint {where}: field 'version' is {document.version}; this streamem reads {CHECKPOINT_VERSION}"
            )
        return document

    def dump(self) -> bytes:
        # A model's state is JSON-ready already (its to_dict); pydantic's walk through it (5,000 keyed
        # filters: a third of a second a checkpoint) is left to orjson.
        fields = self.model_dump(exclude={"model"})
        return orjson.dumps({name: getattr(self, name) if name == "model" else fields[name]
                             for name in type(self).model_fields}, option=orjson.OPT_SERIALIZE_NUMPY)


class Checkpoint(_Document):
    """The instance's checkpoint: counters, and its one model (None with keyed models)."""

    version: int
    key: str
    model: dict | None
    detector: DetectorDocument | None
    offsets: Offsets
    counters: CountersDocument
    replica: dict | None = None  # with --replicate: the replica's log position and de-duplication table
    regimes: dict[str, int] | None = None  # with --model hmm: the regime last announced on each partition
    settings: dict[str, Any] | None = None  # MODEL_SETTINGS when written (None: written before they were kept)


class FilterCheckpoint(_Document):
    """With `--model hmm --replicate`: one partition's filter, for whichever consumer reads the partition next."""

    version: int
    stream: str
    offset: int = Field(ge=0, lt=2**63)  # the offset of the partition's next record: where the filter is
    state: dict  # the model's stream_state: the filter and the open block's rows
    block_offsets: list[int]  # the input offsets of the open block's records
    regime: int | None = None  # the regime last announced on the partition
    settings: dict[str, Any] | None = None


class ModelCheckpoint(_Document):
    """One keyed model: its state and the next offset of every partition it has learned through."""

    version: int
    model_key: str
    model: dict
    detector: DetectorDocument
    learned_through: Offsets
    settings: dict[str, Any] | None = None


def model_checkpoint(
    model_key: str,
    model: dict,
    detector: dict,
    learned_through: dict[tuple[str, int], int],
    settings: dict | orjson.Fragment | None,
) -> bytes:
    """A keyed model's document (`ModelCheckpoint`), dumped without pydantic's validation on write.

    The consumer writes one for every key learned since the last checkpoint (thousands each time),
    and validating them cost three quarters of the time. Every field comes from the consumer's own
    objects (a model's and its detector's `to_dict`, offsets it counted, `model_settings`: dumped
    once a checkpoint, as an `orjson.Fragment`), and `ModelCheckpoint.parse` checks all of it when it
    is read. The detector's state, the one part made of computed numbers a model's own checks do not
    cover, is checked to be finite: JSON would store a NaN as null, which a restart refuses, and the
    document would replace the last good one.
    """
    detector_json = orjson.dumps(detector, option=orjson.OPT_SERIALIZE_NUMPY)
    if b"null" in detector_json:  # orjson writes NaN and infinities as null; none of its fields may be null
        raise ValueError(f"the model of key {model_key!r}: its drift detector's state is not finite")
    document = {
        "version": CHECKPOINT_VERSION,
        "model_key": model_key,
        "model": model,
        "detector": orjson.Fragment(detector_json),
        "learned_through": [
            {"topic": topic, "partition": partition, "offset": offset}
            for (topic, partition), offset in sorted(learned_through.items())
        ],
        "settings": settings,
    }
    return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)


def is_warm_state(state: dict | None) -> bool:
    """Whether a stored model state has finished its warm-up (its engine exists from then on)."""
    return isinstance(state, dict) and state.get("engine") is not None


def restore_model(model_type, state: dict, where: str, field: str = "model"):
    """`model_type.from_dict(state)`, its errors naming the checkpoint and field."""
    import streamem as se
    from streamem.state import OnlineStateDocument

    if model_type in (se.OnlineGMM, se.OnlineRegressionMixture):  # a hidden Markov model checks its own document
        try:
            OnlineStateDocument.model_validate(state)
        except ValidationError as error:
            raise CheckpointError(f"checkpoint {where}: {describe(error, under=field)}") from None
    try:
        return model_type.from_dict(state)
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {where}: field {field!r}: {error}") from None


def restore_detector(state: DetectorDocument, where: str, field: str = "detector"):
    from streamem.drift import WeightDriftDetector

    try:
        return WeightDriftDetector.from_dict(state.model_dump())
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {where}: field {field!r}: {error}") from None


def make_store(settings: ConsumerSettings, sink):
    if settings.checkpoint_dir is not None:
        return DirectoryStore(settings.checkpoint_dir)
    return TopicStore(settings, sink)


class DirectoryStore:
    """One file per key, replaced atomically (write, fsync, rename).

    A file is named by its key, percent-encoded. A key whose name would pass the file
    systems' 255-byte limit (a long or non-ASCII model key) is named by a readable
    prefix, `+` (which percent-encoding never leaves bare) and a hash of the key, with
    the key itself in a `.key` file beside it, so `load_prefix` can still say whose it is.
    """

    _LONGEST_NAME = 200  # bytes, leaving room for ".json.partial" under the 255-byte limit

    def __init__(self, directory: pathlib.Path):
        self.directory = pathlib.Path(directory)

    def _path(self, key: str) -> pathlib.Path:
        name = urllib.parse.quote(key, safe="")
        if len(name) > self._LONGEST_NAME:
            name = f"{name[:120]}+{hashlib.sha256(key.encode()).hexdigest()}"
        return self.directory / (name + ".json")

    def _write(self, path: pathlib.Path, value: bytes) -> None:
        partial = path.with_suffix(path.suffix + ".partial")
        with open(partial, "wb") as handle:
            handle.write(value)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)

    def where(self, key: str) -> str:
        """How error messages name the checkpoint of `key`."""
        return f"file {self._path(key)}"

    def save_all(self, entries: list[tuple[str, bytes]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for key, value in entries:
            path = self._path(key)
            if "+" in path.name:
                self._write(path.with_suffix(".key"), key.encode())
            self._write(path, value)

    def load(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.exists() else None

    def load_prefix(self, prefix: str) -> dict[str, bytes]:
        if not self.directory.exists():
            return {}
        found = {}
        for path in self.directory.glob("*.json"):
            if "+" in path.name:
                key = path.with_suffix(".key").read_text()
            else:
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

    def where(self, key: str) -> str:
        """How error messages name the checkpoint of `key`."""
        return f"state topic {self.topic!r} key {key!r}"

    def save_all(self, entries: list[tuple[str, bytes]]) -> None:
        self.sink.send_all([OutputRecord(self.topic, key.encode(), value) for key, value in entries])

    def load(self, key: str) -> bytes | None:
        return self.load_prefix(key).get(key)

    def load_prefix(self, prefix: str, timeout_s: float = 30.0) -> dict[str, bytes]:
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        from streamem_connectors.kafka.security import kafka_python_security
        from streamem_connectors.kafka.topics import BrokerUnreachable, connect_timeout_options, silent_client

        with silent_client():
            try:
                consumer = KafkaConsumer(
                    bootstrap_servers=self.settings.bootstrap_servers,
                    group_id=None,
                    enable_auto_commit=False,
                    **connect_timeout_options(KafkaConsumer, self.settings),
                    **kafka_python_security(self.settings),
                )
            except KafkaError as error:  # no broker: one line, as ensure_topics says it
                raise BrokerUnreachable.of(self.settings, error) from None
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
                            if message.value:
                                latest[message.key.decode()] = message.value
                            else:  # a tombstone (or an empty value) deletes the key
                                latest.pop(message.key.decode(), None)
                highs = [consumer.highwater(tp) for tp in assigned]
                if all(h is not None for h in highs) and all(
                    consumer.position(tp) >= h for tp, h in zip(assigned, highs, strict=True)
                ):
                    return latest
                if time.monotonic() > deadline:
                    raise CheckpointError(f"could not read the state topic {self.topic!r} to its end in {timeout_s}s")
        finally:
            consumer.close()
