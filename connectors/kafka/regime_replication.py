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
an "init" message holding its warmed model; every replica starts from the first init in the log.
Until it has read that init a warm replica publishes no blocks: if its own init came first they go
out as computed, else their records are learned again, from fresh filters, under the log's
parameters (its states were the labels of its own warm-up). A later init (another replica warmed
up at the same moment) is learned as an update, its states matched to the log's by their means.
A message whose input offsets overlap what the log has learned (a partition taken over before its
previous owner's last block was read) is skipped by every replica, with a WARNING: no record is
learned twice.

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

import numpy as np
from scipy.optimize import linear_sum_assignment

from streamem.families.markov import HMMStats
from streamem.outliers import TOO_LARGE
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
    StatisticsLog,
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
Leftovers = dict[str, tuple[list, list[Position]]]  # stream -> (rows, their input records): to learn again


def _count(value, where: str, field: str) -> int:
    """A checkpoint's count (an offset): an int in [0, 2**63), else CheckpointError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise CheckpointError(f"checkpoint {where}: field {field!r} must be an offset (an integer >= 0), got {value!r}")
    return value


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
        self.shared_key = f"{settings.group_id}/replica"
        self.filter_prefix = f"{settings.group_id}/filter/"
        # Statistics messages are made only while a batch is answered, and go out with its outputs: what
        # the log does to the model in between (idle, checkpoint, finish) leaves records in `leftovers`.
        self.messages: list[schemas.OutputRecord] = []
        self.log_offset = 0  # next statistics message to apply
        self.applied: dict[Partition, int] = {}  # input offsets the log has learned through, per partition
        self.started = False  # the log's first init has started the model
        self.at: dict[str, int] = {}  # stream -> the offset of its next record (where its filter is)
        self.pending: dict[str, list[Position]] = {}  # stream -> the input records of its open block
        self.cold: dict[str, list[Position]] = {}  # the input records of the model's warm-up buffer, by stream
        # blocks completed after this replica's own warm-up, before it read the log's first init: published
        # if that init is its own, else learned again: (stream, rows, input records, statistics)
        self.held: list[tuple[str, list, list[Position], HMMStats]] = []
        self.leftovers: Leftovers = {}  # answered, to learn (again) at the next batch
        self.changed: set[str] = set()  # streams moved since the last checkpoint
        self.caught_up = False  # the whole log applied once (before the first batch: what is learned already)
        self.first_offsets: dict[str, int] = {}
        found = store.load_prefix(f"{settings.group_id}/")
        self.stored_filters = {k: v for k, v in found.items() if k.startswith(self.filter_prefix)}
        self.stale = False  # stored filters to be re-read before the next batch (a rebalance happened)
        self._restore_all(found)
        self.log = StatisticsLog(settings, self.log_offset)

    # -- restoring ---------------------------------------------------------------------------------
    def _restore_all(self, found: dict[str, bytes]) -> None:
        settings, store = self.settings, self.store
        candidates = []
        positions = input_positions(settings)
        for key in (settings.checkpoint_key, self.shared_key):
            raw = found.get(key)
            if raw is None:
                continue
            where = store.where(key)
            with remedy_for_refusal(settings, key, where, raw):
                checkpoint = Checkpoint.parse(raw, where)
                if checkpoint.replica is None:
                    raise CheckpointError(f"checkpoint {where}: field 'replica' is null (written without --replicate?)")
                replica = checkpoint.replica
                warm = is_warm_state(replica.get("model"))
                own = key == settings.checkpoint_key
                offsets = check_resume(settings, where, checkpoint.settings, checkpoint.offsets,
                                       positions if own else None, warm)
                if key == settings.checkpoint_key:
                    self.book.advance(offsets)
                    self.counters = Counters(**checkpoint.counters.model_dump())
                    self.state.since_drift_record = self.counters.records_in % settings.drift_every
                    if checkpoint.detector is not None:
                        self.state.detector = restore_detector(checkpoint.detector, where)
                    self.regimes = checked_regimes(checkpoint.regimes, settings.n_components, where)
                log_offset = _count(replica.get("log_offset"), where, "replica.log_offset")
            candidates.append((log_offset, replica, key, where, raw))
        # the most advanced replica state (every replica's model at a log offset is the same); what this
        # replica held unlearned in a state a more advanced one overtook is learned at its first batch
        for log_offset, replica, key, where, raw in sorted(candidates, key=lambda c: c[0]):
            with remedy_for_refusal(settings, key, where, raw):
                self.leftovers.update(self._unlearned())
                self._restore_replica(replica, where, log_offset, positions)
        logger.info("replica restored at statistics offset %d (%d records learned)", self.log_offset,
                    self.state.model.n_seen)

    def _restore_replica(self, replica: dict, where: str, log_offset: int, positions) -> None:
        for field in ("model", "applied"):
            if field not in replica:
                raise CheckpointError(f"checkpoint {where}: field 'replica.{field}' is missing")
        model = restore_model(model_type(self.settings), replica["model"], where, field="replica.model")
        if not isinstance(replica.get("started", False), bool):
            raise CheckpointError(f"checkpoint {where}: field 'replica.started' must be true or false")
        try:
            applied = {(str(t), int(p)): int(o) for t, p, o in replica["applied"]}
            for (topic, partition), offset in applied.items():  # what the log learned is in the input
                end = positions.ranges.get(partition, (0, -1))[1] if topic == positions.topic else -1
                if not 0 <= offset <= end:
                    raise ValueError(f"offset {offset} of {topic}[{partition}] is not in the input (it ends at "
                                     f"{end})")
            cold: dict[str, list[Position]] = {}
            for t, p, o in replica.get("cold", []):
                cold.setdefault(stream_name(str(t), int(p)), []).append((str(t), int(p), int(o)))
            buffered = {entry["stream"]: len(entry["rows"]) for entry in model.to_dict()["warm_up"]}
            if {stream: len(records) for stream, records in cold.items()} != buffered:
                raise ValueError(f"input records {cold} do not match the warm-up buffer's rows {buffered}")
            leftovers = {
                str(stream): ([list(map(float, row)) for row in rows], [(str(t), int(p), int(o)) for t, p, o in inputs])
                for stream, rows, inputs in replica.get("leftovers", [])
            }
            if any(len(rows) != len(records) for rows, records in leftovers.values()):
                raise ValueError("leftover rows and input records differ in number")
            for rows, _ in leftovers.values():
                if rows and not np.abs(np.asarray(rows, dtype=float)).max() < TOO_LARGE:
                    raise ValueError(f"leftover rows hold a value beyond {TOO_LARGE:.0e} (or not finite)")
        except (TypeError, ValueError, OverflowError) as error:
            raise CheckpointError(f"checkpoint {where}: field 'replica': {error}") from None
        self.state.model, self.log_offset, self.applied, self.cold = model, log_offset, applied, cold
        self.leftovers.update(leftovers)
        self.started = bool(replica.get("started", model.is_warm))

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

    def process(self, batch, decoded=None):
        """Answer as the instance's hidden Markov model does; the statistics messages follow the drift and
        regime_change records."""
        self.catch_up(to_end=not self.caught_up)
        self.caught_up = True
        if self.started and self.held:  # this replica's own init came first: its blocks go out as computed
            for _, _, positions, statistics in self.held:
                self.messages.append(self._message("update", statistics, _sources(positions), len(positions)))
            self.held = []
        if self.leftovers and self.started:
            leftovers, self.leftovers = self.leftovers, {}
            self._relearn(leftovers)
        if self.stale:
            self.stored_filters = self.store.load_prefix(self.filter_prefix)
            self.stale = False
        batch = list(batch)  # read three times below: made once (a view would make them at each reading)
        self.first_offsets = {}
        for record in batch:  # where each partition's records start, undecodable ones included
            self.first_offsets.setdefault(stream_name(record.topic, record.partition), record.offset)
        for stream in self.first_offsets:
            self._follow(stream)
        outputs = super().process(batch, decoded)
        for record in batch:  # a partition whose records were all refused has moved on too
            stream = stream_name(record.topic, record.partition)
            self.at[stream] = record.offset + 1
            self.changed.add(stream)
        messages, self.messages = self.messages, []
        return outputs + messages

    def _filter(self, stream: str, records, rows: np.ndarray) -> tuple:
        """Answer a partition's rows with its filter; rows the log has learned already are not learned
        again, the others go to the warm-up or to blocks, whose statistics are published. All or nothing:
        if the model refuses the rows, the filter is where it was."""
        model = self.state.model
        state, pending = model.stream_state(stream), list(self.pending.get(stream, []))
        try:
            return self._filter_checked(stream, records, rows)
        except ValueError:  # the model put itself back; the filter of the rows answered as known goes back too
            if state is not None:
                model.restore_stream(stream, state)
            elif model.is_warm:
                model.forget_stream(stream)
            self.pending[stream] = pending
            raise

    def _filter_checked(self, stream: str, records, rows: np.ndarray) -> tuple:
        model = self.state.model
        topic, partition = records[0].topic, records[0].partition
        through = self.applied.get((topic, partition), 0)
        known = sum(1 for record in records if record.offset < through)  # a partition's records are in order
        parts = []
        if known:
            parts.append(model.filter_known(rows[:known], stream=stream))
            self.pending[stream] = []  # the open block's records were learned through another replica
        positions = [(topic, partition, record.offset) for record in records[known:]]
        rows = rows[known:]
        if rows.shape[0] and not model.is_warm:
            needed = model.warmup_needed
            parts.append(model.filter_and_summarize(rows[:needed], stream=stream)[:2])
            self.cold.setdefault(stream, []).extend(positions[:needed])
            rows, positions = rows[needed:], positions[needed:]
            if model.is_warm:
                self._publish_init()
        if rows.shape[0]:
            block = [] if self.started else model.stream_state(stream)["block"] if stream in model.streams_ else []
            filtered, log_likelihood, blocks = model.filter_and_summarize(rows, stream=stream)
            self._publish_blocks(stream, positions, blocks, block + rows.tolist())
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
        self.regimes.pop(stream, None)
        key = self.filter_prefix + stream
        raw = self.stored_filters.get(key)
        if raw is None:
            if first > 0:
                logger.warning("%s: no stored filter; its filter starts anew at offset %d", stream, first)
            return
        try:
            document = FilterCheckpoint.parse(raw, self.store.where(key))
            self._check_filter(document, stream, first)
            model.restore_stream(stream, document.state)
        except Exception as error:  # noqa: BLE001 - a stored document must never stop the consumer
            logger.warning("%s: its filter starts anew: %s", stream, error)
            return
        topic, partition = stream.rsplit("/", 1)
        self.pending[stream] = [(topic, int(partition), offset) for offset in document.block_offsets]
        if document.regime is not None:
            self.regimes[stream] = document.regime
        logger.info("%s: going on from its stored filter at offset %d", stream, first)

    def _check_filter(self, document: FilterCheckpoint, stream: str, first: int) -> None:
        """A stored filter fits this stream where its records start, or CheckpointError says why not."""
        if document.stream != stream:
            raise CheckpointError(f"the stored filter is of stream {document.stream!r}")
        if document.offset != first:
            raise CheckpointError(f"the stored filter is at offset {document.offset}, the partition's records "
                                  f"start at {first}")
        if document.settings != model_settings(self.settings):
            raise CheckpointError("the stored filter was written with other model settings")
        block, offsets = document.state.get("block"), document.block_offsets
        if not isinstance(block, list) or len(offsets) != len(block):
            raise CheckpointError(f"{len(offsets)} input offsets for the open block's rows")
        if any(not 0 <= a < b for a, b in zip(offsets, offsets[1:], strict=False)) or (
            offsets and not 0 <= offsets[-1] < document.offset
        ):
            raise CheckpointError("the open block's input offsets must increase, below the filter's offset")
        if document.regime is not None and not 0 <= document.regime < self.state.model.n_states:
            raise CheckpointError(f"regime {document.regime} is not one of the model's states")

    def _publish_init(self) -> None:
        """This replica's warm-up is done: its warmed model goes to the log; every replica starts from the
        log's first init (this one, if it comes first)."""
        model = self.state.model
        document = model.to_dict()
        document["streams"] = []  # the filters are this replica's
        statistics = model.statistics_.scaled(model.n_seen)  # the warm-up's, as sums
        records = [position for positions in self.cold.values() for position in positions]
        self.messages.append(self._message("init", statistics, _sources(records), model.n_seen, document))
        self.cold = {}

    def _publish_blocks(self, stream: str, positions: list[Position], blocks: list[HMMStats], rows: list) -> None:
        """Each completed block's statistics to the log, with its records' offsets (the open block's first);
        held back, with their rows, until the log has started the model."""
        block = self.pending.setdefault(stream, [])
        block.extend(positions)
        size = self.state.model.batch_size
        for statistics in blocks:
            done, block[:] = block[:size], block[size:]
            if self.started:
                self.messages.append(self._message("update", statistics, _sources(done), size))
            else:
                self.held.append((stream, rows[:size], done, statistics))
                rows = rows[size:]

    def _message(self, kind: str, statistics: HMMStats, sources: list[dict], count: int, model=None):
        return self.log.message(kind, statistics, sources, count, model)

    # -- the replica side --------------------------------------------------------------------------
    def catch_up(self, to_end: bool = False) -> None:
        """Apply the statistics log from where this replica is, through its own messages at least (it
        reads its own writes), to the end with `to_end`."""
        for offset, message in self.log.read(to_end=to_end):
            if message is not None:
                self._apply(message)
            self.log_offset = offset + 1

    def _apply(self, message: StatisticsMessage) -> None:
        ranges = [(s.topic, s.partition, s.first, s.to) for s in message.sources]
        if ranges and all(to <= self.applied.get((t, p), 0) for t, p, _, to in ranges):
            return  # already learned: these records were published again after a crash
        overlap = [(t, p, first, self.applied[(t, p)]) for t, p, first, _ in ranges
                   if first < self.applied.get((t, p), 0)]
        if overlap:  # partly learned already (block boundaries differ): learning it would learn records twice
            logger.warning("statistics message from %s skipped: its records %s overlap what the log has learned "
                           "(through %s); its %d records are not learned", message.origin,
                           [f"{t}[{p}]@{first}" for t, p, first, _ in overlap],
                           [f"{t}[{p}]@{through}" for t, p, _, through in overlap], message.count)
            return
        try:
            if message.kind == "init" and not self.started:
                self._start(message)
            else:
                statistics = HMMStats.from_dict(message.statistics)
                if not np.isclose(statistics.count, message.count, rtol=1e-6):
                    raise ValueError(f"statistics of {statistics.count:.6g} records, the message says "
                                     f"{message.count}")
                if message.kind == "init":  # another replica's warm-up: its states in the log's order
                    statistics = statistics.relabelled(self._matching_states(message))
                self.state.model.apply(statistics)
        except CheckpointError:
            raise
        except (StateError, ValueError) as error:
            logger.error("statistics message from %s skipped: %s", message.origin, error)
            return
        for t, p, _, to in ranges:
            self.applied[(t, p)] = max(self.applied.get((t, p), 0), to)

    def _matching_states(self, message: StatisticsMessage) -> np.ndarray:
        """For each of the model's states, the state of a later init's model with the nearest mean."""
        if message.model is None:
            raise ValueError("an init message without its model")
        theirs = type(self.state.model).from_dict(message.model).means_
        mine = self.state.model.means_
        if theirs.shape != mine.shape:
            raise ValueError(f"an init of means {theirs.shape}, the model's are {mine.shape}")
        distances = ((mine[:, None, :] - theirs[None, :, :]) ** 2).sum(axis=2)
        return linear_sum_assignment(distances)[1]

    def _start(self, message: StatisticsMessage) -> None:
        """The log's first init starts the model: this replica's own (its model is that already), or
        another's; then this replica's unlearned records are learned again through it."""
        if message.run == self.log.run:
            self.started = True
            return
        if message.model is None:
            raise ValueError("an init message without its model")
        started = type(self.state.model).from_dict(message.model)  # StateError: skipped by every replica
        old = self.state.model
        mine = (tuple(old.features_), old.n_states, getattr(old, "covariance_type", None))
        theirs = (tuple(started.features_), started.n_states, getattr(started, "covariance_type", None))
        if mine != theirs:  # this replica is the odd one out: it stops rather than run a model of its own
            raise CheckpointError(f"the group's hidden Markov model (the statistics log's first init, from "
                                  f"{message.origin}) has features, states and covariance type {theirs}; this "
                                  f"replica's settings give {mine}: start it with the group's settings")
        if old.is_warm:
            logger.warning("another replica's warm-up came first in the statistics log: this replica's filters "
                           "start anew under its parameters")
        self.leftovers.update(self._unlearned())
        self.state.model, self.started, self.cold, self.pending, self.held = started, True, {}, {}, []

    def _unlearned(self) -> Leftovers:
        """What this replica answered and the log has not learned, by stream: its warm-up buffer, or the
        blocks it holds back and its open blocks."""
        model, leftovers = self.state.model, {}
        if not model.is_warm:
            for entry in model.to_dict()["warm_up"]:
                leftovers[entry["stream"]] = (entry["rows"], list(self.cold.get(entry["stream"], [])))
            return leftovers
        for stream, rows, positions, _ in self.held:
            held_rows, held_positions = leftovers.setdefault(stream, ([], []))
            held_rows += rows
            held_positions += positions
        for stream in model.streams_:
            state = model.stream_state(stream)
            if state is not None and state["block"]:
                open_rows, open_positions = leftovers.setdefault(stream, ([], []))
                open_rows += state["block"]
                open_positions += self.pending.get(stream, [])
        return leftovers

    def _relearn(self, leftovers: Leftovers) -> None:
        """Records answered but not learned by the log go through the log's model as the first records of
        their streams (fresh filters): learned as blocks, not lost; not those the log has learned since."""
        for stream, (rows, positions) in leftovers.items():
            fresh = [i for i, (t, p, o) in enumerate(positions) if o >= self.applied.get((t, p), 0)]
            if not fresh:
                continue
            self.state.model.forget_stream(stream)
            self.pending.pop(stream, None)
            kept = np.asarray(rows, dtype=float)[fresh]
            _, _, blocks = self.state.model.filter_and_summarize(kept, stream=stream)
            self._publish_blocks(stream, [positions[i] for i in fresh], blocks, kept.tolist())
            topic, partition, _ = positions[0]
            self.at.setdefault(stream, self.offsets.get((topic, partition), positions[fresh[-1]][2] + 1))
            self.changed.add(stream)

    def idle(self) -> None:
        self.catch_up()

    def finish(self) -> None:
        """Before the last checkpoint: apply the log to its end, so stopped replicas agree."""
        self.catch_up(to_end=True)

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        self.catch_up()
        model = self.state.model.to_dict()
        model["streams"] = []  # each partition's filter is stored on its own, for whichever consumer reads it next
        leftovers = dict(self.leftovers)
        if not self.started:  # blocks held back wait as records to learn again (the restart is another run)
            for stream, (rows, positions) in self._unlearned().items():
                if model["engine"] is not None:
                    leftovers[stream] = (rows, positions)
        replica = {
            "log_offset": self.log_offset,
            "applied": [[t, p, o] for (t, p), o in sorted(self.applied.items())],
            "model": model,
            "started": self.started,
            "cold": [list(position) for positions in self.cold.values() for position in positions],
            "leftovers": [[stream, rows, [list(position) for position in positions]]
                          for stream, (rows, positions) in leftovers.items()],
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
            shared_replica = {**replica, "cold": [], "leftovers": []}
            shared = document.model_copy(update={"key": self.shared_key, "replica": shared_replica, "regimes": None})
            entries.append((self.shared_key, shared.dump()))
        self.state.dirty = False
        return entries

    def close(self) -> None:
        self.log.close()
