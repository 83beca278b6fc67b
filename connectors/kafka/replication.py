"""One global model over many consumers: a replicated state machine on a Kafka log.

Every replica (a consumer process with `--replicate`) answers its records with the
model as it stands, then publishes each mini-batch's expected sufficient
statistics, normalised per record and tagged with the input offsets they cover,
to the single-partition statistics topic. A replica changes its model only by
applying that log in order, its own messages included, so all replicas that have
read the log to the same offset hold the same model (expected sufficient
statistics add, so the model depends only on the log's contents and order).
Rules that make the replay deterministic:

- the first "init" message in the log (a warm-up fit of `warmup` records) starts
  the model; a later init (another replica warmed up at the same time) is applied
  as an ordinary update;
- a message whose input offsets were all applied before is skipped, so records
  answered again after a crash are not learned twice.

A replica's checkpoint holds the model, the log offset it has applied through and
the applied input offsets; it is also stored under `<group>/replica`, from which
a new replica starts before reading the rest of the log.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import orjson
import pandas as pd

from streamem.drift import WeightDriftDetector
from streamem.families.gaussian import GaussianStats
from streamem.gaussian_mixture import GaussianMixture
from streamem.outliers import screen_against, screen_warm_up
from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointError,
    is_warm_state,
    model_settings,
    restore_detector,
    restore_model,
)
from streamem_connectors.kafka.clients import input_positions
from streamem_connectors.kafka.learners import (
    Counters,
    _Learner,
    _Model,
    _offset_list,
    assign_and_screen,
    new_model,
    outlier_threshold,
)
from streamem_connectors.kafka.resume import check_resume, differing_settings
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["ReplicatedLearner"]

logger = logging.getLogger(__name__)
Partition = tuple[str, int]


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
    return "give a new --group-id and --statistics-topic for a fresh replicated model"


@contextlib.contextmanager
def _remedy_for_refusal(settings: ConsumerSettings, key: str, where: str, raw: bytes):
    """A CheckpointError raised inside gets the remedy appended (the replica's refusals have no --reset-model)."""
    try:
        yield
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {_replica_remedy(settings, key, where, checkpoint_settings(raw))}") from None


class ReplicatedLearner(_Learner):
    """The learner of `--replicate`: answers with the replicated model, publishes statistics, applies the log."""

    def __init__(self, settings: ConsumerSettings, store):
        super().__init__(settings, store)
        self.log_topic = settings.topics["statistics"]
        self.shared_key = f"{settings.group_id}/replica"
        self.state = _Model(new_model(settings), WeightDriftDetector(max(2, settings.n_components)))
        self.log_offset = 0  # next statistics message to apply
        self.applied: dict[Partition, int] = {}  # input offsets learned through, per partition
        self.warmup_rows: list[np.ndarray] = []
        self.warmup_sources: list = []
        self.init_sent = False  # our warm-up is on its way through the log
        self.sequence = 0
        # Without a checkpoint of its own a replica is not reset: the model is rebuilt from the group's
        # latest replica checkpoint and the statistics log (so no --reset-model here, and no refusal).
        found = store.load_prefix(f"{settings.group_id}/")
        own, shared = found.get(settings.checkpoint_key), found.get(self.shared_key)
        candidates = []
        for key, raw in ((settings.checkpoint_key, own), (self.shared_key, shared)):
            if raw is None:
                continue
            where = store.where(key)
            with _remedy_for_refusal(settings, key, where, raw):
                checkpoint = Checkpoint.parse(raw, where)
                positions = input_positions(settings) if key == settings.checkpoint_key else None
                warm = is_warm_state((checkpoint.replica or {}).get("model"))
                offsets = check_resume(settings, where, checkpoint.settings, checkpoint.offsets, positions, warm)
                if key == settings.checkpoint_key:
                    self.book.advance(offsets)
                    self.counters = Counters(**checkpoint.counters.model_dump())
                    if checkpoint.detector is not None:
                        self.state.detector = restore_detector(checkpoint.detector, where)
            if checkpoint.replica:
                candidates.append((checkpoint.replica, key, where, raw))
        if candidates:  # the most advanced replica state (every replica's state at an offset is the same)
            replica, key, where, raw = max(candidates, key=lambda c: c[0].get("log_offset", -1))
            with _remedy_for_refusal(settings, key, where, raw):
                self._restore(replica, where)
        self.log = _LogReader(settings, self.log_topic, self.log_offset)

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
    def process(self, batch):
        self.catch_up()
        outputs, decoded = self._decode(batch)
        if not decoded.good:
            return outputs
        records = batch if not decoded.errors else [batch[i] for i in decoded.good]
        values, good = decoded.values, decoded.good
        model = self.state.model
        frame = pd.DataFrame(values, columns=self.settings.features)
        resp, log_likelihood, screened = self._assign_and_screen(frame, values)
        if screened.outlier.any():  # dead letters; never answered, never published as statistics
            reasons = {int(i): screened.reason(int(i)) for i in np.flatnonzero(screened.outlier)}
            for position, dead in zip(good, self._dead_letters(records, reasons), strict=True):
                outputs[position] = dead if dead is not None else outputs[position]
            keep = ~screened.outlier
            records, values = [r for r, k in zip(records, keep, strict=True) if k], values[keep]
            good = [position for position, k in zip(good, keep, strict=True) if k]
            resp, log_likelihood = resp[keep], log_likelihood[keep]
            if not records:
                return outputs
        answered = schemas.assignments(
            records,
            self.topics["assignments"],
            resp,
            log_likelihood,
            model.n_seen,
        )
        for i, output in zip(good, answered, strict=True):
            outputs[i] = output
        self.counters.assigned += len(records)
        drifts = []
        if model.is_warm:
            for event in self.state.detector.update_many(resp):
                self.counters.drift_events += 1
                drifts.append(
                    schemas.drift_record(
                        records[event.index],
                        self.topics["drift"],
                        model.n_seen,
                        event.weights,
                        event.reference_weights,
                        event.distance,
                        True,
                    )
                )
        return outputs + drifts + self._publish(records, values)

    def _assign_and_screen(self, frame: pd.DataFrame, values: np.ndarray):
        """(responsibilities, log-likelihoods, outlier screen): the model's screen once it is warm;
        before, the library's warm-up rule (`streamem.outliers.warm_up_reference`) on the records
        waiting for the warm-up and this batch."""
        model = self.state.model
        if model.is_warm:
            resp, log_likelihood, _, screened = assign_and_screen(model, self.settings, frame)
            return resp, log_likelihood, screened
        waiting = np.vstack(self.warmup_rows) if self.warmup_rows else values[:0]
        screened = screen_warm_up(values, self.settings.features, waiting, outlier_threshold(self.settings))
        with np.errstate(over="ignore", invalid="ignore"):  # an absurd row's answer is dropped anyway
            return (*model.assign_many(frame), screened)

    def _publish(self, records, values: np.ndarray) -> list[schemas.OutputRecord]:
        """Statistics messages for these records: mini-batches once the model is warm, else warm-up."""
        model = self.state.model
        if not model.is_warm:
            # Until an init has come back through the log, records wait here; once the model is
            # warm they are published as ordinary updates.
            self.warmup_rows.append(values)
            self.warmup_sources.extend(records)
            buffered = np.vstack(self.warmup_rows)
            if self.init_sent or len(buffered) < self.settings.warmup:
                return []
            self.warmup_rows, waiting = [], self.warmup_sources
            self.warmup_sources = []
            self.init_sent = True
            # a record the batch screens let through but the whole warm-up's median finds absurd stays out
            far = screen_against(buffered, self.settings.features, buffered, outlier_threshold(self.settings)).outlier
            buffered = buffered[~far] if far.any() else buffered
            return [self._message("init", self._warmup_statistics(buffered), _merge(_sources(waiting)), len(buffered))]
        messages = []
        if self.warmup_rows:  # records that waited for the model to warm up
            waiting, rows = self.warmup_sources, np.vstack(self.warmup_rows)
            self.warmup_rows, self.warmup_sources = [], []
            return self._publish(waiting, rows) + self._publish(records, values)
        family = model._family()
        size = self.settings.batch_size
        for start in range(0, len(values), size):
            chunk = values[start : start + size]
            batch = family.prepare(chunk, model._engine.stats.shift)
            stats = family.expected_stats(batch, model._engine.params)[2].scaled(1.0 / len(chunk))
            messages.append(self._message("update", stats, _merge(_sources(records[start : start + size])), len(chunk)))
        return messages

    def _warmup_statistics(self, rows: np.ndarray) -> GaussianStats:
        settings = self.settings
        fit = GaussianMixture(
            settings.n_components, covariance_type=settings.covariance_type, n_init=2, random_state=settings.seed
        ).fit(rows)
        return fit._stats.scaled(1.0 / len(rows))

    def _message(self, kind: str, stats: GaussianStats, sources: list[dict], count: int) -> schemas.OutputRecord:
        self.sequence += 1
        body = {
            "kind": kind,
            "origin": self.settings.instance_id,
            "sequence": self.sequence,
            "count": count,
            "sources": sources,
            "statistics": {name: value.tolist() for name, value in stats.to_arrays().items()},
        }
        return schemas.OutputRecord(self.log_topic, self.settings.instance_id.encode(), orjson.dumps(body))

    # -- the replica side ---------------------------------------------------------------------
    def catch_up(self, to_end: bool = False) -> None:
        """Apply the statistics log from where this replica is (to its end, with `to_end`)."""
        for offset, value in self.log.read(to_end=to_end):
            self._apply(value)
            self.log_offset = offset + 1

    def _apply(self, value: bytes) -> None:
        message = orjson.loads(value)
        ranges = [(s["topic"], s["partition"], s["from"], s["to"]) for s in message["sources"]]
        if ranges and all(to <= self.applied.get((t, p), 0) for t, p, _, to in ranges):
            return  # already learned: these records were published again after a crash
        model = self.state.model
        if not model._feature_names:
            model._feature_names = tuple(self.settings.features)
        stats = GaussianStats(**{k: np.asarray(v, dtype=float) for k, v in message["statistics"].items()})
        if message["kind"] == "init" and not model.is_warm:
            model._start_from_statistics(stats)
        else:
            model._engine.apply(stats)
            model._scorer = None
        model.n_seen += int(message["count"])
        for t, p, _, to in ranges:
            self.applied[(t, p)] = max(self.applied.get((t, p), 0), to)

    def idle(self) -> None:
        self.catch_up()

    def finish(self) -> None:
        """Before the last checkpoint: apply the log to its end, so stopped replicas agree."""
        self.catch_up(to_end=True)

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        self.catch_up()
        replica = None
        if self.state.model.is_warm:
            replica = {
                "log_offset": self.log_offset,
                "applied": [[t, p, o] for (t, p), o in sorted(self.applied.items())],
                "model": self.state.model.to_dict(),
            }
        document = Checkpoint(
            version=CHECKPOINT_VERSION,
            key=self.settings.checkpoint_key,
            model=None,
            detector=self.state.detector.to_dict(),
            offsets=_offset_list(self.offsets),
            counters={k: int(v) for k, v in vars(self.counters).items()},
            replica=replica,
            settings=model_settings(self.settings),
        )
        entries = [(self.settings.checkpoint_key, document.dump())]
        if replica is not None:
            entries.append((self.shared_key, document.model_copy(update={"key": self.shared_key}).dump()))
        return entries

    def weights(self) -> list[float]:
        model = self.state.model
        return model.weights_.tolist() if model.is_warm else []

    def close(self) -> None:
        self.log.close()


def _sources(records) -> list[dict]:
    return [{"topic": r.topic, "partition": r.partition, "from": r.offset, "to": r.offset + 1} for r in records]


def _merge(sources: list[dict]) -> list[dict]:
    """One [from, to) range per input partition (records of a partition arrive in offset order)."""
    ranges: dict[tuple[str, int], list[int]] = {}
    for s in sources:
        key = (s["topic"], s["partition"])
        low, high = ranges.get(key, [s["from"], s["to"]])
        ranges[key] = [min(low, s["from"]), max(high, s["to"])]
    return [{"topic": t, "partition": p, "from": lo, "to": hi} for (t, p), (lo, hi) in sorted(ranges.items())]


class _LogReader:
    """Reads the single-partition statistics topic in order, from a given offset."""

    def __init__(self, settings: ConsumerSettings, topic: str, offset: int):
        from kafka import KafkaConsumer, TopicPartition

        from streamem_connectors.kafka.clients import kafka_python_security

        self.partition = TopicPartition(topic, 0)
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            **kafka_python_security(settings),
        )
        self.consumer.assign([self.partition])
        self.consumer.seek(self.partition, offset)

    def read(self, to_end: bool = False, timeout_s: float = 30.0):
        """Messages as (offset, value): what is there now, or everything up to the end with `to_end`."""
        deadline = time.monotonic() + timeout_s
        while True:
            batches = self.consumer.poll(timeout_ms=200 if to_end else 0)
            for message in batches.get(self.partition, []):
                yield message.offset, message.value
            if not to_end:
                return
            high = self.consumer.highwater(self.partition)
            if high is not None and self.consumer.position(self.partition) >= high and not batches:
                return
            if time.monotonic() > deadline:
                logger.warning("statistics log not read to its end within %.0fs", timeout_s)
                return

    def close(self) -> None:
        self.consumer.close()
