"""The consumer with `--model hmm --replicate`: one hidden Markov model over every consumer of the
group, replicated through the statistics log, and one filter per partition that follows its
partition from consumer to consumer.

Parameters. As with the replicated mixture (`streamem_connectors.kafka.replication`), a replica
changes its model only by applying the statistics log in order, so replicas that have read the log
to the same offset hold the same parameters, and a state means the same regime on every replica.
A partition's records are answered by its filter under the parameters as they stand
(`filter_and_summarize`); each block of `batch_size` records of a partition goes to the log as its
`HMMStats`, tagged with the block's input offsets, and is learned when the log is applied (a
replica reads its own messages back before its next batch). The first replica to warm up publishes
an "init" message holding its warmed model; every replica starts from the first init in the log. A
later init (another replica warmed up at the same moment) is learned as an ordinary update; what
that replica held unlearned (its warm-up records, its open blocks) goes through the log's model
again, from fresh filters: its states were the labels of its own warm-up.

Filters. At every checkpoint each partition's filter, its open block (rows and input offsets) and
the regime last announced there are stored under `<group>/filter/<topic>/<partition>`, with the
offset the filter is at. Whichever consumer reads the partition next (after a restart, a kill -9 or
a rebalance to another instance) goes on from that filter when the partition's first record is at
that offset, so the regimes continue as if one consumer had read the whole partition; otherwise the
filter starts anew and a WARNING says why. Records below the offset the log has learned through
(answered again after a crash) are answered (`filter_known`) and not learned twice.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import orjson
from pydantic import ValidationError

from streamem.families.markov import HMMStats
from streamem.state import StateError
from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointError,
    FilterCheckpoint,
    is_warm_state,
    model_settings,
    restore_detector,
    restore_model,
)
from streamem_connectors.kafka.clients import input_positions
from streamem_connectors.kafka.learner import Counters, Learner, model_type, new_state
from streamem_connectors.kafka.regimes import RegimeLearner, checked_regimes, stream_name
from streamem_connectors.kafka.replication import (
    LogReader,
    StatisticsMessage,
    merged_sources,
    remedy_for_refusal,
)
from streamem_connectors.kafka.resume import check_resume
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["ReplicatedRegimeLearner"]

logger = logging.getLogger(__name__)
Partition = tuple[str, int]
Position = tuple[str, int, int]  # (topic, partition, offset) of an input record


def _sources(positions: list[Position]) -> list[dict]:
    return merged_sources([{"topic": t, "partition": p, "from": o, "to": o + 1} for t, p, o in positions])


class ReplicatedRegimeLearner(RegimeLearner):
    """The learner of `--model hmm --replicate`: filters per partition, parameters through the statistics log."""

    forgets_lost = True  # a partition gone elsewhere takes its filter along (through its stored filter)

    def __init__(self, settings: ConsumerSettings, store):
        # not the instance model's checkpoint (RegimeLearner's): a replica's, as below
        Learner.__init__(self, settings, store)
        self.regimes: dict[str, int] = {}
        self.refused_in_a_row: dict[str, int] = {}
        self.state = new_state(settings)
        self.log_topic = settings.topics["statistics"]
        self.shared_key = f"{settings.group_id}/replica"
        self.filter_prefix = f"{settings.group_id}/filter/"
        self.messages: list[schemas.OutputRecord] = []  # statistics messages of the batch being answered
        self.log_offset = 0  # next statistics message to apply
        self.applied: dict[Partition, int] = {}  # input offsets the log has learned through, per partition
        self.started = False  # the log's first init has started the model
        self.at: dict[str, int] = {}  # stream -> the offset of its next record (where its filter is)
        self.pending: dict[str, list[Position]] = {}  # stream -> the input records of its open block
        self.cold: list[Position] = []  # the records in the model's warm-up buffer, in its order
        self.changed: set[str] = set()  # streams moved since the last checkpoint
        self.sequence = 0
        self.run = uuid.uuid4().hex
        self.own_applied = 0
        self.caught_up = False  # the whole log applied once (before the first batch: what is learned already)
        self.leftovers: dict[str, tuple[list, list[Position]]] = {}  # answered, to learn once the model is warm
        found = store.load_prefix(f"{settings.group_id}/")
        self.stored_filters = {k: v for k, v in found.items() if k.startswith(self.filter_prefix)}
        self.stale = False  # stored filters to be re-read before the next batch (a rebalance happened)
        self._restore_all(found)
        self.log = LogReader(settings, self.log_topic, self.log_offset)

    # -- restoring ---------------------------------------------------------------------------------
    def _restore_all(self, found: dict[str, bytes]) -> None:
        settings, store = self.settings, self.store
        candidates = []
        for key in (settings.checkpoint_key, self.shared_key):
            raw = found.get(key)
            if raw is None:
                continue
            where = store.where(key)
            with remedy_for_refusal(settings, key, where, raw):
                checkpoint = Checkpoint.parse(raw, where)
                replica = checkpoint.replica or {}
                positions = input_positions(settings) if key == settings.checkpoint_key else None
                warm = is_warm_state(replica.get("model"))
                offsets = check_resume(settings, where, checkpoint.settings, checkpoint.offsets, positions, warm)
                if key == settings.checkpoint_key:
                    self.book.advance(offsets)
                    self.counters = Counters(**checkpoint.counters.model_dump())
                    self.state.since_drift_record = self.counters.records_in % settings.drift_every
                    if checkpoint.detector is not None:
                        self.state.detector = restore_detector(checkpoint.detector, where)
                    self.regimes = checked_regimes(checkpoint.regimes, settings.n_components, where)
            if replica:
                candidates.append((replica, key, where, raw))
        if not candidates:
            return
        # the most advanced replica state (every replica's model at a log offset is the same); a warm-up
        # buffer of this replica's that a warm model overtook is learned through it at the first batch
        ordered = sorted(candidates, key=lambda c: c[0].get("log_offset", -1))
        for replica, key, where, raw in ordered:
            self._restore_replica(replica, key, where, raw)
            if self.cold and replica is not ordered[-1][0]:
                own_cold = self._warm_up_leftovers(self.state.model)
                self.state.model, self.cold = new_state(settings).model, []
                self.leftovers = own_cold
        self.started = self.state.model.is_warm
        logger.info("replica restored at statistics offset %d (%d records learned)", self.log_offset,
                    self.state.model.n_seen)

    def _restore_replica(self, replica: dict, key: str, where: str, raw: bytes) -> None:
        settings = self.settings
        with remedy_for_refusal(settings, key, where, raw):
            for field in ("model", "log_offset", "applied"):
                if field not in replica:
                    raise CheckpointError(f"checkpoint {where}: field 'replica.{field}' is missing")
            self.state.model = restore_model(model_type(settings), replica["model"], where, field="replica.model")
            try:
                self.log_offset = int(replica["log_offset"])
                self.applied = {(t, int(p)): int(o) for t, p, o in replica["applied"]}
                self.cold = [(str(t), int(p), int(o)) for t, p, o in replica.get("cold", [])]
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"checkpoint {where}: field 'replica.applied': {error}") from None
            if len(self.cold) != self.state.model.n_seen * (not self.state.model.is_warm):
                raise CheckpointError(f"checkpoint {where}: field 'replica.cold': {len(self.cold)} records for a "
                                      f"warm-up buffer of {self.state.model.n_seen}")

    # -- the consumer side -------------------------------------------------------------------------
    def start_offsets(self, assigned: list[Partition]) -> dict[Partition, int]:
        """Drop the filters of partitions gone elsewhere (their new owner goes on from their stored filters);
        a warm-up buffer keeps their records. (Runs in the client's rebalance callback: nothing may block.)"""
        resume, lost = self.book.resume(assigned)
        for topic, partition in lost:
            stream = stream_name(topic, partition)
            if self.state.model.is_warm:
                self.state.model.forget_stream(stream)
            for table in (self.at, self.pending, self.regimes, self.refused_in_a_row):
                table.pop(stream, None)
            self.changed.discard(stream)
        self.stale = True  # a previous owner may have just stored the filters of our new partitions
        return resume

    def process(self, batch):
        """Answer as the instance's hidden Markov model does; the statistics messages of the blocks the
        batch completed follow the drift and regime_change records."""
        self.messages = []
        self.catch_up(to_end=not self.caught_up)
        self.caught_up = True
        if self.leftovers and self.state.model.is_warm:
            leftovers, self.leftovers = self.leftovers, {}
            self._relearn(leftovers)
        if self.stale:
            self.stored_filters = self.store.load_prefix(self.filter_prefix)
            self.stale = False
        self.first_offsets: dict[str, int] = {}
        for record in batch:  # where each partition's records start, undecodable ones included
            self.first_offsets.setdefault(stream_name(record.topic, record.partition), record.offset)
        outputs = super().process(batch)
        for record in batch:
            self.at[stream_name(record.topic, record.partition)] = record.offset + 1
        messages, self.messages = self.messages, []
        return outputs + messages

    def _filter(self, stream: str, records, rows: np.ndarray) -> tuple:
        """Answer a partition's rows with its filter; rows the log has learned already are not learned
        again, the others go to the warm-up or to blocks, whose statistics are published."""
        self._follow(stream)
        model = self.state.model
        topic, partition = records[0].topic, records[0].partition
        through = self.applied.get((topic, partition), 0)
        known = sum(1 for record in records if record.offset < through)  # a partition's records are in order
        self.changed.add(stream)
        parts = []
        if known:
            parts.append(model.filter_known(rows[:known], stream=stream))
            self.pending[stream] = []  # the open block's records were learned through another replica
        if known < len(records):
            positions = [(topic, partition, record.offset) for record in records[known:]]
            was_cold, needed = not model.is_warm, model.warmup_needed
            filtered, log_likelihood, blocks = model.filter_and_summarize(rows[known:], stream=stream)
            if was_cold:
                self.cold.extend(positions[:needed])
                positions = positions[needed:]
                if model.is_warm:
                    self._publish_init()
            self._publish_blocks(stream, positions, blocks)
            parts.append((filtered, log_likelihood))
        return np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _follow(self, stream: str) -> None:
        """Make sure the model's filter of `stream` is where the stream's records start: go on from the
        stream's stored filter if this replica's is not (a partition new to it), else start anew."""
        model, first = self.state.model, self.first_offsets[stream]
        if not model.is_warm or (self.at.get(stream) == first and model.stream_state(stream) is not None):
            return
        model.forget_stream(stream)  # whatever this replica had of it is from another time
        self.pending.pop(stream, None)
        key = self.filter_prefix + stream
        raw = self.stored_filters.get(key)
        if raw is None:
            if first > 0:
                logger.info("%s: no stored filter; its filter starts at offset %d", stream, first)
            return
        try:
            document = FilterCheckpoint.parse(raw, self.store.where(key))
            if document.offset != first:
                raise CheckpointError(f"the stored filter is at offset {document.offset}, the partition's records "
                                      f"start at {first}")
            if len(document.block_offsets) != len(document.state.get("block", ())):
                raise CheckpointError(f"{len(document.block_offsets)} offsets for the open block's "
                                      f"{len(document.state.get('block', ()))} rows")
            if document.regime is not None and not 0 <= document.regime < model.n_states:
                raise CheckpointError(f"regime {document.regime} is not one of the model's states")
            model.restore_stream(stream, document.state)
        except (CheckpointError, StateError) as error:
            logger.warning("%s: its filter starts anew: %s", stream, error)
            return
        topic, partition = stream.rsplit("/", 1)
        self.pending[stream] = [(topic, int(partition), offset) for offset in document.block_offsets]
        if document.regime is not None:
            self.regimes[stream] = document.regime
        logger.info("%s: going on from its stored filter at offset %d", stream, first)

    def _publish_init(self) -> None:
        """This replica's warm-up is done: its warmed model goes to the log; every replica starts from the
        log's first init (this one, if it comes first)."""
        model = self.state.model
        document = model.to_dict()
        document["streams"] = []  # the filters are this replica's
        statistics = model.statistics_.scaled(model.n_seen)  # the warm-up's, as sums
        self.messages.append(self._message("init", statistics, _sources(self.cold), model.n_seen, document))
        self.cold = []

    def _publish_blocks(self, stream: str, positions: list[Position], blocks: list[HMMStats]) -> None:
        """Each completed block's statistics to the log, with its records' offsets (the open block's first)."""
        block = self.pending.setdefault(stream, [])
        block.extend(positions)
        size = self.state.model.batch_size
        for statistics in blocks:
            done, block[:] = block[:size], block[size:]
            self.messages.append(self._message("update", statistics, _sources(done), size))

    def _message(self, kind: str, statistics: HMMStats, sources: list[dict], count: int, model=None):
        self.sequence += 1
        body = {
            "kind": kind,
            "origin": self.settings.instance_id,
            "run": self.run,
            "sequence": self.sequence,
            "count": count,
            "sources": sources,
            "statistics": statistics.to_dict(),  # sums over the `count` records
            "model": model,
        }
        return schemas.OutputRecord(self.log_topic, self.settings.instance_id.encode(),
                                    orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))

    # -- the replica side --------------------------------------------------------------------------
    def catch_up(self, to_end: bool = False) -> None:
        """Apply the statistics log from where this replica is, through its own messages at least (it
        reads its own writes), to the end with `to_end`."""
        until = None if to_end else (lambda: self.own_applied >= self.sequence)
        for offset, value in self.log.read(to_end=to_end, until=until):
            self._apply(value)
            self.log_offset = offset + 1

    def _apply(self, value: bytes) -> None:
        try:
            message = StatisticsMessage.model_validate_json(value)
        except ValidationError as error:  # every replica skips the same message, so they still agree
            logger.error("statistics message skipped: %s", str(error).replace("\n", "; "))
            return
        if message.run == self.run:
            self.own_applied = max(self.own_applied, message.sequence)
        ranges = [(s.topic, s.partition, s.to) for s in message.sources]
        if ranges and all(to <= self.applied.get((t, p), 0) for t, p, to in ranges):
            return  # already learned: these records were published again after a crash
        leftovers = {}
        try:
            if message.kind == "init" and not self.started:
                leftovers = self._start(message)
            else:
                statistics = HMMStats.from_dict(message.statistics)
                if not np.isclose(statistics.count, message.count, rtol=1e-6):
                    raise ValueError(f"statistics of {statistics.count:.6g} records, the message says "
                                     f"{message.count}")
                self.state.model.apply(statistics)
        except (StateError, ValueError) as error:
            logger.error("statistics message from %s skipped: %s", message.origin, error)
            return
        for t, p, to in ranges:
            self.applied[(t, p)] = max(self.applied.get((t, p), 0), to)
        self._relearn(leftovers)  # after the init's offsets are applied: what it learned is not learned again

    def _start(self, message: StatisticsMessage) -> dict[str, tuple[list, list[Position]]]:
        """The log's first init starts the model: this replica's own (its model is that already), or
        another's; returns this replica's unlearned records, to go through it again."""
        if message.run == self.run:
            self.started = True
            return {}
        if message.model is None:
            raise ValueError("an init message without its model")
        started = type(self.state.model).from_dict(message.model)  # StateError: skipped by every replica
        old = self.state.model
        mine = (tuple(old.features_), old.n_states, getattr(old, "covariance_type", None))
        theirs = (tuple(started.features_), started.n_states, getattr(started, "covariance_type", None))
        if mine != theirs:
            raise ValueError(f"the group's model (features, states, covariance type) is {theirs}, this replica's "
                             f"settings give {mine}: start it with the group's settings")
        leftovers: dict[str, tuple[list, list[Position]]] = {}
        if old.is_warm:  # warmed up at the same moment as the log's: its open blocks start again
            logger.warning("another replica's warm-up came first in the statistics log: this replica's filters "
                           "start anew under its parameters")
            for stream in old.streams_:
                rows = old.stream_state(stream)["block"]
                if rows:
                    leftovers[stream] = (rows, self.pending.get(stream, []))
        else:
            leftovers = self._warm_up_leftovers(old)
        self.state.model, self.started, self.cold, self.pending = started, True, [], {}
        return leftovers

    def _relearn(self, leftovers: dict[str, tuple[list, list[Position]]]) -> None:
        """Records answered but not learned by the log (a warm-up another replica's overtook) go through
        the log's model as the first records of their streams: learned as blocks, not lost."""
        for stream, (rows, positions) in leftovers.items():
            # not those the log has learned already (an init of this replica's previous run, say)
            fresh = [i for i, (t, p, o) in enumerate(positions) if o >= self.applied.get((t, p), 0)]
            if not fresh:
                continue
            rows = np.asarray(rows, dtype=float)[fresh]
            _, _, blocks = self.state.model.filter_and_summarize(rows, stream=stream)
            self._publish_blocks(stream, [positions[i] for i in fresh], blocks)
            self.changed.add(stream)

    def _warm_up_leftovers(self, model) -> dict[str, tuple[list, list[Position]]]:
        """A cold model's warm-up buffer by stream, with the input records of its rows."""
        cold, leftovers = iter(self.cold), {}
        for entry in model.to_dict()["warm_up"]:
            leftovers[entry["stream"]] = (entry["rows"], [next(cold) for _ in entry["rows"]])
        return leftovers

    def idle(self) -> None:
        self.catch_up()

    def finish(self) -> None:
        """Before the last checkpoint: apply the log to its end, so stopped replicas agree."""
        self.catch_up(to_end=True)

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        self.catch_up()
        model = self.state.model.to_dict()
        model["streams"] = []  # each partition's filter is stored on its own, for whichever consumer reads it next
        replica = {
            "log_offset": self.log_offset,
            "applied": [[t, p, o] for (t, p), o in sorted(self.applied.items())],
            "model": model,
            "cold": [list(position) for position in self.cold],
        }
        entries = []
        stored = model_settings(self.settings)
        for stream in sorted(self.changed):
            state = self.state.model.stream_state(stream)
            if state is None or stream not in self.at:
                continue
            document = FilterCheckpoint(
                version=CHECKPOINT_VERSION,
                stream=stream,
                offset=self.at[stream],
                state=state,
                block_offsets=[offset for _, _, offset in self.pending.get(stream, [])],
                regime=self.regimes.get(stream),
                settings=stored,
            )
            entries.append((self.filter_prefix + stream, document.dump()))
        self.changed = set()
        document = self.instance_checkpoint(
            detector=self.state.detector.to_dict(), replica=replica, regimes=self.regimes
        )
        entries.append((self.settings.checkpoint_key, document.dump()))  # last: the filters are stored before it
        if self.started:  # where a new replica starts from
            shared = document.model_copy(update={"key": self.shared_key, "replica": {**replica, "cold": []},
                                                 "regimes": None})
            entries.append((self.shared_key, shared.dump()))
        self.state.dirty = False
        return entries

    def close(self) -> None:
        self.log.close()
