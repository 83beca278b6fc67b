"""One global model over many consumers: a replicated state machine on a Kafka log.

Every replica (a consumer process with `--replicate`) answers its records with the
model as it stands, then publishes each mini-batch's expected sufficient
statistics (sums over its records, `SufficientStatistics.to_dict`), tagged with the
input offsets they cover, to the single-partition statistics topic. A replica changes its model only by
applying that log in order, its own messages included, so all replicas that have
read the log to the same offset hold the same model (expected sufficient
statistics add, so the model depends only on the log's contents and order).
Rules that make the replay deterministic:

- the first "init" message in the log (a warm-up fit of `warmup` records) starts
  the model; a later init (another replica warmed up at the same time) is applied
  as an ordinary update;
- a message whose input offsets were all applied before is skipped, so records
  answered again after a crash are not learned twice;
- a message that cannot be read (bad statistics) is skipped, by every replica alike.

A replica reads its own messages back before it answers its next batch, and until the log has
warmed the model it answers and learns with a model of its own, as an instance model would (its
warm-up becomes the init message): so one replica answers a stream as the plain consumer does.

A replica's checkpoint holds the model, the log offset it has applied through and
the applied input offsets; it is also stored under `<group>/replica`, from which
a new replica starts before reading the rest of the log.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Literal, NamedTuple

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import streamem as se
from streamem.state import StateError
from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.checkpoint import (
    Checkpoint,
    CheckpointError,
    is_warm_state,
    restore_detector,
    restore_model,
)
from streamem_connectors.kafka.clients import input_positions
from streamem_connectors.kafka.learner import Counters, Learner, ModelState, new_state
from streamem_connectors.kafka.resume import check_resume, differing_settings
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = [
    "ReplicatedLearner",
    "StatisticsLog",
    "StatisticsMessage",
    "merged_sources",
    "record_sources",
    "remedy_for_refusal",
]

logger = logging.getLogger(__name__)
Partition = tuple[str, int]


class _Source(BaseModel):
    """The input offsets [from, to) of one partition a statistics message covers."""

    model_config = ConfigDict(populate_by_name=True)
    topic: str
    partition: int = Field(ge=0)
    first: int = Field(alias="from", ge=0)
    to: int = Field(lt=2**63)

    @model_validator(mode="after")
    def _ordered(self):
        if self.to <= self.first:
            raise ValueError(f"empty range [{self.first}, {self.to})")
        return self


class StatisticsMessage(BaseModel):
    """A message of the statistics log, checked before it is applied (a bad one is skipped by every replica)."""

    kind: Literal["init", "update"]
    origin: str
    run: str | None = None
    sequence: int = Field(ge=1)
    count: int = Field(ge=1, lt=2**40)  # records summarised; far below what n_seen can count
    sources: list[_Source] = Field(min_length=1)  # the records summarised: what keeps them from being learned twice
    statistics: dict
    model: dict | None = None  # a hidden Markov model's init: the warmed model (parameters and statistics)


def checkpoint_settings(raw: bytes) -> dict | None:
    """The settings a stored checkpoint recorded, if it can be read that far."""
    try:
        stored = orjson.loads(raw).get("settings")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return stored if isinstance(stored, dict) else None


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or value is None:
        return flag if value else f"no {flag}"
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"


def _replica_remedy(settings: ConsumerSettings, key: str, where: str, stored: dict | None) -> str:
    """What to do about a refused replica checkpoint (--reset-model does not apply to --replicate)."""
    differing = differing_settings(stored, settings, warm=True)
    if differing:  # the whole group's model (and its statistics log) has the checkpoint's settings
        flags = " ".join(_flag(name, old) for name, old, _ in differing)
        return (
            f"start with the checkpoint's settings ({flags}), or give a new --group-id and --statistics-topic "
            "for a fresh replicated model"
        )
    if key == settings.checkpoint_key:
        return (
            f"delete {where} (a tombstone on the state topic): the replica then rebuilds the model from "
            f"{settings.group_id}/replica and the statistics log"
        )
    return (
        f"delete {where} (a tombstone on the state topic): each replica then rebuilds the model from its own "
        "checkpoint and the statistics log"
    )


@contextlib.contextmanager
def remedy_for_refusal(settings: ConsumerSettings, key: str, where: str, raw: bytes):
    """A CheckpointError raised inside gets the remedy appended (the replica's refusals have no --reset-model)."""
    try:
        yield
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {_replica_remedy(settings, key, where, checkpoint_settings(raw))}") from None


class ReplicatedLearner(Learner):
    """The learner of `--replicate`: answers with the replicated model, publishes statistics, applies the log."""

    def __init__(self, settings: ConsumerSettings, store):
        super().__init__(settings, store)
        self.shared_key = f"{settings.group_id}/replica"
        self.state: ModelState = new_state(settings)
        self.messages: list[schemas.OutputRecord] = []  # statistics messages of the batch being answered
        self.log_offset = 0  # next statistics message to apply
        self.applied: dict[Partition, int] = {}  # input offsets learned through, per partition
        # Until the replicated model is warm, records are answered and learned by a model of this
        # replica's own, exactly as an instance model would; when it warms up its statistics become
        # the "init" message, and what it learns after that is published as it learns it. Once the
        # log has warmed the replicated model (reading its own writes, that is before the next batch)
        # the two are the same, and this one is dropped.
        self.waiting: ModelState | None = new_state(settings)
        self.warmup_sources: list = []  # the records of the waiting model's warm-up (topic, partition, offset)
        self.warmup_rows: list[np.ndarray] = []  # and their rows, published if another replica's init comes first
        self.caught_up = False  # the whole log applied once (before the first batch: what is learned already)
        self.init_sent = False  # our warm-up is on its way through the log
        # Without a checkpoint of its own a replica is not reset: the model is rebuilt from the group's
        # latest replica checkpoint and the statistics log (so no --reset-model here, and no refusal).
        found = store.load_prefix(f"{settings.group_id}/")
        own, shared = found.get(settings.checkpoint_key), found.get(self.shared_key)
        candidates = []
        for key, raw in ((settings.checkpoint_key, own), (self.shared_key, shared)):
            if raw is None:
                continue
            where = store.where(key)
            with remedy_for_refusal(settings, key, where, raw):
                checkpoint = Checkpoint.parse(raw, where)
                positions = input_positions(settings) if key == settings.checkpoint_key else None
                warm = is_warm_state((checkpoint.replica or {}).get("model"))
                offsets = check_resume(settings, where, checkpoint.settings, checkpoint.offsets, positions, warm)
                if key == settings.checkpoint_key:
                    self.book.advance(offsets)
                    self.counters = Counters(**checkpoint.counters.model_dump())
                    self.state.since_drift_record = self.counters.records_in % settings.drift_every
                    if checkpoint.detector is not None:
                        self.state.detector = restore_detector(checkpoint.detector, where)
            if checkpoint.replica:
                candidates.append((checkpoint.replica, key, where, raw))
        if candidates:  # the most advanced replica state (every replica's state at an offset is the same)
            replica, key, where, raw = max(candidates, key=lambda c: c[0].get("log_offset", -1))
            with remedy_for_refusal(settings, key, where, raw):
                self._restore(replica, where)
        for replica, key, where, raw in candidates:
            if key == settings.checkpoint_key:
                with remedy_for_refusal(settings, key, where, raw):
                    self._restore_warm_up(replica, where)
        self.waiting.detector = self.state.detector  # one detector, whichever model answers
        self.waiting.since_drift_record = self.state.since_drift_record
        self.log = StatisticsLog(settings, self.log_offset)

    def _restore_warm_up(self, replica: dict, where: str) -> None:
        """The records this replica's waiting model held at its last checkpoint (answered, not yet
        published): replayed into it while the replicated model is cold, else published with the
        first batch (`_leave_waiting_model`)."""
        rows, sources = replica.get("warmup_rows") or [], replica.get("warmup_sources") or []
        if not rows:
            return
        try:
            values = np.asarray(rows, dtype=float).reshape(len(rows), len(self.settings.features))
            positions = [_Position(str(t), int(p), int(o)) for t, p, o in sources]
            if len(positions) != len(values):
                raise ValueError(f"{len(values)} rows but {len(positions)} sources")
            if not self.state.model.is_warm:
                self.waiting.model.learn_many(values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {where}: field 'replica.warmup_rows': {error}") from None
        self.warmup_rows, self.warmup_sources = [values], positions

    def _restore(self, replica: dict, where: str) -> None:
        for field in ("model", "log_offset", "applied"):
            if field not in replica:
                raise CheckpointError(f"checkpoint {where}: field 'replica.{field}' is missing")
        self.state.model = restore_model(type(self.state.model), replica["model"], where, field="replica.model")
        try:
            self.log_offset = int(replica["log_offset"])
            self.applied = {(t, int(p)): int(o) for t, p, o in replica["applied"]}
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"checkpoint {where}: field 'replica.applied': {error}") from None

        logger.info(
            "replica restored at statistics offset %d (%d records learned)", self.log_offset, self.state.model.n_seen
        )

    # -- the consumer side -------------------------------------------------------------------
    def process(self, batch, decoded=None):
        """Answer as every learner does; the statistics messages of the learned records follow the drift records.

        Records the log has learned already (answered again after a crash or a rebalance) are answered
        but not published again."""
        self.messages = []
        self.catch_up(to_end=not self.caught_up)
        self.caught_up = True
        if self.waiting is not None and self.state.model.is_warm:
            self._leave_waiting_model()
        outputs, decoded = self._decode(batch, decoded)
        if decoded.good:
            records = self.valid_records(batch, decoded)
            learn = np.array([r.offset >= self.applied.get((r.topic, r.partition), 0) for r in records], dtype=bool)
            state = self.state if self.waiting is None else self.waiting
            answered, drifts = self._answer(state, records, decoded.values, learn)
            for i, output in zip(decoded.good, answered, strict=True):
                outputs[i] = output
            outputs += drifts
        messages, self.messages = self.messages, []
        return outputs + messages

    def _leave_waiting_model(self) -> None:
        """The log has warmed the replicated model: answer with it from now on. Records the waiting model
        took for a warm-up it never published (another replica's init came first) are published now."""
        if self.warmup_rows and not self.init_sent:
            rows = np.vstack(self.warmup_rows)
            # not those the log has learned already (an init of this replica's previous run, say)
            applied = self.applied
            fresh = [i for i, r in enumerate(self.warmup_sources) if r.offset >= applied.get((r.topic, r.partition), 0)]
            self.learn_statistics(self.state, self.warmup_sources, rows, None, np.array(fresh, dtype=int), None)
        self.state.since_drift_record = self.waiting.since_drift_record
        self.waiting, self.warmup_rows, self.warmup_sources = None, [], []

    def learn_warm_up(self, state: ModelState, records, X: np.ndarray, target, rows: np.ndarray) -> tuple[dict, int]:
        """The waiting model's warm-up, as an instance model's; when it completes, its statistics go
        to the log as the "init" message (its records' offsets with them)."""
        model = state.model
        cold = not model.is_warm
        refused, done = super().learn_warm_up(state, records, X, target, rows)
        if cold:
            taken = [int(i) for i in rows[:done] if int(i) not in refused]
            self.warmup_sources.extend(_Position(*_position_of(records[i])) for i in taken)
            self.warmup_rows.append(X[taken])
        if cold and model.is_warm and not self.init_sent:
            self.init_sent = True
            start = model.statistics_.scaled(model.n_seen)  # nothing but the warm-up has been blended in yet
            sources = merged_sources(record_sources(self.warmup_sources))
            self.warmup_sources, self.warmup_rows = [], []
            self.messages.append(self._message("init", start, sources, model.n_seen))
        return refused, done

    def learn_statistics(self, state: ModelState, records, X: np.ndarray, target, rows: np.ndarray, responsibilities):
        """Each mini-batch's statistics go to the log (`apply_statistics`)."""
        self.learn_in_chunks(state, records, X, target, rows, responsibilities)

    def apply_statistics(self, state: ModelState, statistics, records) -> None:
        """Publish a mini-batch's statistics; every replica applies them in the log's order (the
        waiting model learns them now, as the replicated one will)."""
        if state is self.waiting:
            state.model.apply(statistics)
        sources = merged_sources(record_sources(records))
        self.messages.append(self._message("update", statistics, sources, round(statistics.count)))

    def offer_outliers(self, state: ModelState, X: np.ndarray, target, offered: np.ndarray) -> np.ndarray:
        """Refused records are never published: the replicated model learns only what was answered."""
        return np.zeros(len(offered), dtype=bool)

    def _message(self, kind: str, stats: se.GaussianStats, sources: list[dict], count: int) -> schemas.OutputRecord:
        return self.log.message(kind, stats, sources, count)

    # -- the replica side ---------------------------------------------------------------------
    def catch_up(self, to_end: bool = False) -> None:
        """Apply the statistics log from where this replica is, at least through the messages this
        replica has published (it reads its own writes: a batch is answered by a model that has
        learned every earlier batch, as in the other modes); to its end with `to_end`."""
        for offset, message in self.log.read(to_end=to_end):
            if message is not None:
                self._apply(message)
            self.log_offset = offset + 1

    def _apply(self, message: StatisticsMessage) -> None:
        ranges = [(s.topic, s.partition, s.to) for s in message.sources]
        if ranges and all(to <= self.applied.get((t, p), 0) for t, p, to in ranges):
            return  # already learned: these records were published again after a crash
        try:
            stats = se.GaussianStats.from_dict(message.statistics)
            if np.isclose(stats.count, 1.0) and message.count != 1:  # written per record, before they were sums
                stats = stats.scaled(message.count)
            if not np.isclose(stats.count, message.count, rtol=1e-6):
                raise ValueError(f"statistics of {stats.count:.6g} records, the message says {message.count}")
            self.state.model.apply(stats)
        except (StateError, ValueError) as error:
            logger.error("statistics message from %s skipped: %s", message.origin, error)
            return
        for t, p, to in ranges:
            self.applied[(t, p)] = max(self.applied.get((t, p), 0), to)

    def idle(self) -> None:
        self.catch_up()

    def finish(self) -> None:
        """Before the last checkpoint: apply the log to its end, so stopped replicas agree."""
        self.catch_up(to_end=True)

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        self.catch_up()
        replica = {
            "log_offset": self.log_offset,
            "applied": [[t, p, o] for (t, p), o in sorted(self.applied.items())],
            "model": self.state.model.to_dict(),
        }
        if self.warmup_rows:  # answered, waiting for a warm-up not yet published: kept, not lost
            replica["warmup_rows"] = np.vstack(self.warmup_rows).tolist()
            replica["warmup_sources"] = [list(position) for position in self.warmup_sources]
        document = self.instance_checkpoint(detector=self.state.detector.to_dict(), replica=replica)
        entries = [(self.settings.checkpoint_key, document.dump())]
        if self.state.model.is_warm:  # where a new replica starts from
            shared = {name: value for name, value in replica.items() if not name.startswith("warmup_")}
            shared_document = document.model_copy(update={"key": self.shared_key, "replica": shared})
            entries.append((self.shared_key, shared_document.dump()))
        return entries

    def weights(self) -> list[float]:
        model = self.state.model
        return model.weights_.tolist() if model.is_warm else []

    def close(self) -> None:
        self.log.close()


class _Position(NamedTuple):
    """Where a record came from (what a statistics message's sources are made of)."""

    topic: str
    partition: int
    offset: int


def _position_of(record) -> tuple[str, int, int]:
    return record.topic, record.partition, record.offset


def record_sources(records) -> list[dict]:
    return [{"topic": r.topic, "partition": r.partition, "from": r.offset, "to": r.offset + 1} for r in records]


def merged_sources(sources: list[dict]) -> list[dict]:
    """One [from, to) range per input partition (records of a partition arrive in offset order)."""
    ranges: dict[tuple[str, int], list[int]] = {}
    for s in sources:
        key = (s["topic"], s["partition"])
        low, high = ranges.get(key, [s["from"], s["to"]])
        ranges[key] = [min(low, s["from"]), max(high, s["to"])]
    return [{"topic": t, "partition": p, "from": lo, "to": hi} for (t, p), (lo, hi) in sorted(ranges.items())]


class StatisticsLog:
    """A replica's side of the statistics log: the messages it publishes (numbered within its run, so it
    knows its own when it reads them back) and the messages it reads, in the log's order."""

    def __init__(self, settings: ConsumerSettings, offset: int):
        self.settings = settings
        self.topic = settings.topics["statistics"]
        self.run = uuid.uuid4().hex  # tells this run's messages from an earlier run's of the same instance
        self.sequence = 0  # messages this run has published
        self.own_read = 0  # the last of them read back
        self.reader = LogReader(settings, self.topic, offset)

    def message(self, kind: str, statistics, sources: list[dict], count: int, model: dict | None = None):
        """The next message of this run: statistics (sums over `count` records) and the input records they
        cover (`model`: a hidden Markov model's init carries the warmed model)."""
        self.sequence += 1
        body = {
            "kind": kind,
            "origin": self.settings.instance_id,
            "run": self.run,
            "sequence": self.sequence,
            "count": count,
            "sources": sources,
            "statistics": statistics.to_dict(),
        }
        if model is not None:
            body["model"] = model
        value = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        return schemas.OutputRecord(self.topic, self.settings.instance_id.encode(), value)

    def read(self, to_end: bool = False):
        """(log offset, message) through this run's own messages at least (a replica reads its own writes),
        to the end with `to_end`; a message that cannot be read is None (every replica skips it alike)."""
        until = None if to_end else (lambda: self.own_read >= self.sequence)
        for offset, value in self.reader.read(to_end=to_end, until=until):
            try:
                message = StatisticsMessage.model_validate_json(value)
            except ValidationError as error:
                logger.error("statistics message skipped: %s", str(error).replace("\n", "; "))
                message = None
            if message is not None and message.run == self.run:
                self.own_read = max(self.own_read, message.sequence)
            yield offset, message

    def close(self) -> None:
        self.reader.close()


class LogReader:
    """Reads the single-partition statistics topic in order, from a given offset."""

    def __init__(self, settings: ConsumerSettings, topic: str, offset: int):
        from kafka import KafkaConsumer, TopicPartition

        from streamem_connectors.kafka.security import kafka_python_security

        self.partition = TopicPartition(topic, 0)
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=20,  # a replica waits for its own messages before answering: fetch them at once
            **kafka_python_security(settings),
        )
        self.consumer.assign([self.partition])
        self.consumer.seek(self.partition, offset)

    def read(self, to_end: bool = False, timeout_s: float = 30.0, until=None):
        """Messages as (offset, value): what is there now; with `until`, also what comes until it
        returns True; with `to_end`, everything up to the end. A log that does not deliver within
        `timeout_s` is left with a warning (the replica answers with the model it has)."""
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = until is not None and not until()
            batches = self.consumer.poll(timeout_ms=200 if to_end or waiting else 0)
            for message in batches.get(self.partition, []):
                yield message.offset, message.value
            if until is not None and until() and not to_end:
                return
            if not to_end and not waiting:
                return
            if to_end:
                high = self.consumer.highwater(self.partition)
                if high is not None and self.consumer.position(self.partition) >= high and not batches:
                    return
            if time.monotonic() > deadline:
                logger.warning("statistics log not read %s within %.0fs", "to its end" if to_end else "through this "
                               "replica's own messages", timeout_s)
                return

    def close(self) -> None:
        self.consumer.close()
