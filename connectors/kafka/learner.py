"""How the consumer answers a poll batch, whatever the mode: the one learner its modes share.

A learner decodes a poll batch, answers every record with the model as it stands (prequential:
an assignment, or a dead letter for an undecodable record or one the outlier guard refuses),
feeds the drift detector and writes drift records, and learns the records: while the model is
cold its warm-up takes them, after that each mini-batch's statistics, made from the
responsibilities the records were answered with (one E-step answers and learns). The modes
differ in where statistics are applied (`Learner.learn_statistics`): on the instance's own model
or on each key's model (`streamem_connectors.kafka.learners`), all of a poll's at once
(`learn_answered`), or through the statistics log of the replicated model, one mini-batch at a
time (`streamem_connectors.kafka.replication`: `learn_in_chunks` hands each to its
`apply_statistics`; it also runs its own warm-up until the log's and never offers refused records
to the model).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math

import numpy as np

import streamem as se
from streamem.drift import WeightDriftDetector
from streamem.schedules import StepSize
from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.checkpoint import CHECKPOINT_VERSION, Checkpoint, PartitionOffset, model_settings
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = [
    "Counters",
    "Learner",
    "ModelState",
    "OffsetBook",
    "assign_and_screen",
    "model_type",
    "new_model",
    "new_state",
    "offset_list",
    "outlier_threshold",
]

logger = logging.getLogger(__name__)
Partition = tuple[str, int]


@dataclasses.dataclass
class Counters:
    """Totals over every run; a checkpoint holds exactly these names (`checkpoint.CountersDocument`)."""

    records_in: int = 0
    assigned: int = 0
    dead_lettered: int = 0
    drift_events: int = 0


def new_model(settings: ConsumerSettings):
    """A fresh model of this run's settings, knowing its features (so it takes arrays)."""
    step = StepSize(alpha=settings.step_alpha, eta_min=settings.step_floor)
    common = dict(batch_size=settings.batch_size, step=step, warmup=settings.warmup, seed=settings.seed)
    if settings.model == "hmm" and settings.target is not None:
        return se.OnlineMarkovSwitchingRegression(settings.n_components, features=tuple(settings.features), **common)
    if settings.model == "hmm":
        return se.OnlineGaussianHMM(
            settings.n_components, covariance_type=settings.covariance_type, features=tuple(settings.features), **common
        )
    common.update(outliers="skip", outlier_threshold=outlier_threshold(settings))
    if settings.target is not None:
        model = se.OnlineRegressionMixture(settings.n_components, **common)
        model.add_features(settings.features)
        return model
    return se.OnlineGMM(
        settings.n_components, covariance_type=settings.covariance_type, features=tuple(settings.features), **common
    )


def new_state(settings: ConsumerSettings) -> ModelState:
    """A fresh model with its drift detector (two columns at least: a one-component model's second stays 0)."""
    return ModelState(new_model(settings), WeightDriftDetector(max(2, settings.n_components)))


def outlier_threshold(settings: ConsumerSettings) -> float | None:
    """The library's threshold for --outlier-threshold (inf: no distance rule, None in the library)."""
    return None if math.isinf(settings.outlier_threshold) else settings.outlier_threshold


def assign_and_screen(model, settings: ConsumerSettings, features: np.ndarray, target=None):
    """(responsibilities, log-likelihoods, predictions or None, `OutlierScreen`) of a batch under
    this run's threshold, from one E-step (the distances come from the same log-densities).

    The consumer dead-letters the rows the screen refuses instead of answering them; the model
    itself skips (never raises on) any it would still refuse while learning, so a refusal can
    never stop the consumer.
    """
    model.set_outlier_rule("skip", outlier_threshold(settings))  # a restored model keeps its own otherwise
    if target is None:
        responsibilities, log_likelihood, screened = model.assign_and_screen_many(features)
        return responsibilities, log_likelihood, None, screened
    return model.assign_and_screen_many(features, target)


def model_type(settings: ConsumerSettings):
    if settings.model == "hmm":
        return se.OnlineGaussianHMM if settings.target is None else se.OnlineMarkovSwitchingRegression
    return se.OnlineRegressionMixture if settings.target is not None else se.OnlineGMM


@dataclasses.dataclass
class ModelState:
    """A model, its drift detector, and for keyed models the offsets it has learned through."""

    model: object
    detector: WeightDriftDetector
    learned_through: dict[Partition, int] = dataclasses.field(default_factory=dict)
    since_drift_record: int = 0
    dirty: bool = False


class OffsetBook:
    """The next offset of each partition a model has learned through, and where to resume after a
    rebalance (where the model is, so it neither skips nor re-learns a record).

    With `forget_lost` (one model per key) the offsets of partitions that went to another
    consumer are dropped: their models go with them. Otherwise the model keeps what it learned.
    """

    def __init__(self, offsets: dict[Partition, int] | None = None, forget_lost: bool = False):
        self.offsets = dict(offsets or {})
        self.forget_lost = forget_lost
        self._revoked: set[Partition] = set()

    def advance(self, offsets: dict[Partition, int]) -> None:
        self.offsets.update(offsets)

    def revoked(self, partitions: list[Partition]) -> None:
        self._revoked |= set(partitions)

    def resume(self, assigned: list[Partition]) -> tuple[dict[Partition, int], set[Partition]]:
        """(the start offset of each assigned partition the model has a position in, the lost partitions);
        the others start at the group's committed offset."""
        lost, self._revoked = self._revoked - set(assigned), set()
        if self.forget_lost:
            for tp in lost:
                self.offsets.pop(tp, None)
        return {tp: self.offsets[tp] for tp in assigned if tp in self.offsets}, lost


class Learner:
    """Decodes, answers and learns a poll batch; subclasses keep the models, say where statistics
    are applied, and what to checkpoint.

    `process(batch)` returns one output per input record, in order (an assignment or
    a dead letter), then any others (drift records, statistics messages).
    """

    forgets_lost = False  # see OffsetBook

    @property
    def offsets(self) -> dict[Partition, int]:
        """Next offset per partition, once learned."""
        return self.book.offsets

    def advance(self, offsets: dict[Partition, int]) -> None:
        """Record the next offset of each partition, once a batch is learned."""
        self.book.advance(offsets)

    def revoked(self, partitions: list[Partition]) -> None:
        self.book.revoked(partitions)

    def start_offsets(self, assigned: list[Partition]) -> dict[Partition, int]:
        return self.book.resume(assigned)[0]

    def finish(self) -> None:
        """Called before the last checkpoint of a clean stop."""

    def idle(self) -> None:
        """Called when a poll brought no records."""

    def close(self) -> None:
        """Release the learner's own clients, if any."""

    def __init__(self, settings: ConsumerSettings, store):
        self.settings = settings
        self.store = store
        self.topics = settings.topics
        self.decoder = schemas.RecordDecoder(settings.features, settings.target, settings.model_key)
        self.feature_order = tuple(settings.features)  # the decoder's columns (then the target's)
        self.counters = Counters()
        self.book = OffsetBook(forget_lost=self.forgets_lost)

    def instance_checkpoint(
        self, model: dict | None = None, detector: dict | None = None, replica=None, regimes=None
    ) -> Checkpoint:
        """This instance's checkpoint document (`<group>/<instance>`): the offsets, the counters and the
        settings every mode stores, with what the mode keeps there (its model and detector, or none)."""
        return Checkpoint(
            version=CHECKPOINT_VERSION,
            key=self.settings.checkpoint_key,
            model=model,
            detector=detector,
            offsets=offset_list(self.offsets),
            counters=dataclasses.asdict(self.counters),
            replica=replica,
            regimes=regimes,
            settings=model_settings(self.settings),
        )

    @staticmethod
    def valid_records(batch, decoded: schemas.DecodedBatch) -> list:
        """The records of the valid rows (`decoded.good`), in order, as a list: made at once, not each when
        asked for as a batch's `records_view()` makes them (for a learner that reads them one by one)."""
        records = list(batch)
        return records if not decoded.errors else [records[i] for i in decoded.good]

    def _decode(self, batch, decoded: schemas.DecodedBatch | None = None) -> tuple[list, schemas.DecodedBatch]:
        """Decode a batch (unless `decoded` already); the invalid records' dead letters go in their places
        in the outputs."""
        if decoded is None:
            decoded = self.decoder.decode_batch([record.value for record in batch], [record.key for record in batch])
        self.counters.records_in += len(batch)
        return self._dead_letters(batch, dict(decoded.errors)), decoded

    def _dead_letters(self, records, reasons: dict[int, str]) -> list:
        """Dead letters for the records refused ({position: reason}: undecodable, or refused by the
        model's outlier guard), in their places (None elsewhere)."""
        outputs: list = [None] * len(records)
        for i, reason in reasons.items():
            record = records[i]
            logger.warning(
                "dead-lettered %s: %s",
                record.where(),
                reason,
                extra={"source": schemas.source_of(record), "error": reason},
            )
            outputs[i] = schemas.dead_letter(record, self.topics["dead_letter"], reason)
        self.counters.dead_lettered += len(reasons)
        return outputs

    # -- where learning happens: on the model itself, unless a subclass says otherwise ---------------
    def learn(self, state: ModelState, records, X: np.ndarray, target, to_learn: np.ndarray, responsibilities) -> dict:
        """Learn the rows marked in `to_learn`, answered already with `responsibilities`; returns
        {position: reason} of rows the model refused while learning them (by what it became within
        this batch: its warm-up fit, or the warm-up reference growing), which get dead letters
        instead of their answers.

        While the model is cold, rows go to its warm-up (it buffers them and fits on `warmup` of
        them); after that, learning is statistics (`learn_statistics`)."""
        positions = np.flatnonzero(to_learn)
        refused, done = self.learn_warm_up(state, records, X, target, positions)
        if done < positions.size:  # after a warm-up within this batch the answers' parameters are gone
            self.learn_statistics(state, records, X, target, positions[done:], responsibilities if done == 0 else None)
        return refused

    def learn_warm_up(self, state: ModelState, records, X: np.ndarray, target, rows: np.ndarray) -> tuple[dict, int]:
        """Give a cold model the first of `rows` its warm-up still needs, until it is warm (it
        buffers them and fits on `warmup` of them); returns (refused {position: reason}, rows used)."""
        model = state.model
        refused, done = {}, 0
        while done < rows.size and not model.is_warm:
            take = rows[done : done + model.warmup_needed]
            if target is None:
                model.learn_many(X[take])
            else:
                model.learn_many(X[take], target[take])
            refused.update({int(take[i]): str(error) for i, error in model.skipped_})
            done += take.size
        return refused, done

    def learn_statistics(self, state: ModelState, records, X: np.ndarray, target, rows: np.ndarray, responsibilities):
        """Learn rows of a warm model as statistics, one mini-batch at a time (the first one completes
        what the model has pooled): from the responsibilities they were answered with when given
        (one E-step answers and learns), else from an E-step now. Here, on the model itself, all at
        once (`learn_answered`); a learner that applies them elsewhere overrides `apply_statistics`
        and learns them through `learn_in_chunks`."""
        if responsibilities is None:
            self.learn_in_chunks(state, records, X, target, rows, None)
        elif rows.size == X.shape[0]:  # rows are positions in X, in order, each once: all of them, uncopied
            state.model.learn_answered(X, responsibilities, target)
        else:
            state.model.learn_answered(X[rows], responsibilities[rows], None if target is None else target[rows])

    def learn_in_chunks(self, state: ModelState, records, X: np.ndarray, target, rows: np.ndarray, responsibilities):
        """`learn_statistics`, each mini-batch's statistics handed to `apply_statistics` with its records."""
        model, start, size = state.model, 0, state.model.records_until_update
        records = list(records)  # read one by one below: made at once (a batch's view makes each when asked)
        while start < rows.size:
            # the first chunk completes what the model has pooled, the others are whole mini-batches (the
            # replicated model does not change while its chunks are only being published)
            chunk, size = rows[start : start + size], model.batch_size
            features, targets = X[chunk], None if target is None else target[chunk]
            if responsibilities is None:
                stats = model.summarize(features, targets).statistics
            else:
                stats = model.statistics_of(features, responsibilities[chunk], targets)
            self.apply_statistics(state, stats, [records[int(i)] for i in chunk])
            start += chunk.size

    def apply_statistics(self, state: ModelState, statistics, records) -> None:
        """Where statistics are learned: here, on the model itself (the replicated learner publishes them)."""
        state.model.apply(statistics)

    def offer_outliers(self, state: ModelState, X: np.ndarray, target, offered: np.ndarray) -> np.ndarray:
        """Give the model the rows its screen refused (`offered`); True for those it learned after all.

        That is how a model sees a stream that has moved (most recent records refused) and warms up
        again from them; such rows are then answered, as the model as it was scored them."""
        taken = np.zeros(len(offered), dtype=bool)
        if not offered.any():
            return taken
        model = state.model
        if target is None:
            model.learn_many(X[offered])
        else:
            model.learn_many(X[offered], target[offered])
        positions = np.flatnonzero(offered)
        taken[positions] = True
        taken[[int(positions[i]) for i, _ in model.skipped_]] = False
        return taken

    def can_answer_warm_up(self, state: ModelState, n_rows: int) -> bool:
        """Whether `answer_warm_ups` takes `n_rows` rows of this model, all to be learned: its warm-up
        takes them all without finishing, its columns are the decoder's and its components this run's
        (a model restored from an older checkpoint may have others: it answers alone, in `_answer`)."""
        model = state.model
        return (
            not model.is_warm
            and n_rows < model.warmup_needed
            and model.features_ == self.feature_order
            and model.n_components == self.settings.n_components
        )

    def answer_warm_ups(self, groups: list, values: np.ndarray):
        """Cold models' rows answered and learned in one call for all (`assign_and_learn_each`: one
        compiled call for cold Gaussian mixtures), each as `_answer` answers them: `groups` are (model
        key, state, records, their positions in the poll) whose rows follow each other in `values`
        (`can_answer_warm_up`).

        Returns (WarmUpAnswers of the models that learned their rows, whose records the caller builds
        for the whole poll at once; [(positions, outputs, drift records)] of the others: those whose
        screen refused a row, answered by `_answer` from the same answers, and, with no outputs, the
        drift records of a model whose warm-up finished within its rows after all)."""
        models = [group[1].model for group in groups]
        threshold = outlier_threshold(self.settings)
        for model in models:  # this run's rule (a restored model keeps its own otherwise), as `assign_and_screen`
            model.set_outlier_rule("skip", threshold)
        bounds = [0, *itertools.accumulate(len(group[2]) for group in groups)]
        seen = [model.n_seen for model in models]
        X, target = self.model_columns(groups[0][1], values)
        responsibilities, log_likelihood, predictions, screens = type(models[0]).assign_and_learn_each(
            models, X, bounds, target
        )
        learned, others = WarmUpAnswers(responsibilities, log_likelihood, predictions), []
        for g, (key, state, records, positions) in enumerate(groups):
            a, b = bounds[g], bounds[g + 1]
            if screens[g] is not None:  # nothing learned: `_answer` dead-letters, offers and learns as always
                scored = (
                    responsibilities[a:b],
                    log_likelihood[a:b],
                    None if predictions is None else predictions[a:b],
                    screens[g],
                )
                answered, drifts = self._answer(
                    state, records, values[a:b], np.ones(b - a, dtype=bool), model_key=key, scored=scored
                )
                others.append((positions, answered, drifts))
                continue
            skipped = models[g].skipped_
            refused = {int(i): str(error) for i, error in skipped} if skipped else {}
            state.dirty = True
            learned.add(positions, records, key, (a, b), seen[g], refused)
            if not models[g].is_warm:  # the usual case: a cold model's answers say nothing of drift
                state.since_drift_record += b - a - len(refused)
                continue
            # a warm-up finished within the rows after all (a re-warm from refused records): the drift
            # path as `_answer` runs it, for the periodic record
            to_learn = np.ones(b - a, dtype=bool)
            to_learn[list(refused)] = False
            drifts = self._drift(state, records, responsibilities[a:b], to_learn, False, seen[g], key)
            others.append(([], [], drifts))
        return learned, others

    # -- the one way records are answered --------------------------------------------------------
    def model_columns(self, state: ModelState, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(features in the model's column order, targets or None) of decoded rows (the decoder's
        columns are the settings' features, then the target)."""
        features = self.feature_order
        d = len(features)
        order = state.model.features_
        X = values[:, :d] if order == features else values[:, [features.index(n) for n in order]]
        return X, None if self.settings.target is None else values[:, d]

    def _answer(
        self, state: ModelState, records, values: np.ndarray, to_learn: np.ndarray, model_key=None, scored=None
    ):
        """Score the rows with the model as it is (prequential), then learn the rows marked in `to_learn`
        (where, says the mode); a row the model's outlier guard refuses gets a dead letter
        instead, and is not learned. (`scored`: the rows' answers, already screened.)"""
        settings, model = self.settings, state.model
        X, target = self.model_columns(state, values)
        resp, log_likelihood, predictions, screened = scored or assign_and_screen(model, settings, X, target)
        if screened is not None and screened.outlier.any():
            records = list(records)  # read several times below: made once (a batch's view makes them at each)
            keep = ~screened.outlier
            answered, drifts = ([], [])
            if keep.any():
                kept = [record for record, good in zip(records, keep, strict=True) if good]
                answers = (resp[keep], log_likelihood[keep], None if predictions is None else predictions[keep], None)
                answered, drifts = self._answer(state, kept, values[keep], to_learn[keep], model_key, answers)
            taken = self.offer_outliers(state, X, target, screened.outlier & to_learn)
            outputs = self._dead_letters(
                records, {int(i): screened.reason(int(i)) for i in np.flatnonzero(screened.outlier & ~taken)}
            )
            if taken.any():
                seen = model.n_seen - int(taken.sum())
                taken_answers = schemas.assignments(
                    [record for record, t in zip(records, taken, strict=True) if t],
                    self.topics["assignments"],
                    resp[taken],
                    log_likelihood[taken],
                    seen,
                    None if predictions is None else predictions[taken],
                    model_key,
                )
                self.counters.assigned += len(taken_answers)
                for i, answer in zip(np.flatnonzero(taken), taken_answers, strict=True):
                    outputs[int(i)] = answer
                state.dirty = True
            rest = iter(answered)
            return [output if output is not None else next(rest) for output in outputs], drifts
        seen_before, was_warm = model.n_seen, model.is_warm
        answered = schemas.assignments(
            records,
            self.topics["assignments"],
            resp,
            log_likelihood,
            seen_before,
            predictions,
            model_key,
        )
        self.counters.assigned += len(records)
        refused = self.learn(state, records, X, target, to_learn, resp)
        if refused:
            for i, dead in enumerate(self._dead_letters(records, refused)):
                answered[i] = dead if dead is not None else answered[i]
            self.counters.assigned -= len(refused)
            to_learn = to_learn.copy()
            to_learn[list(refused)] = False
        drifts = self._drift(state, records, resp, to_learn, was_warm, seen_before, model_key)
        state.dirty = True
        return answered, drifts

    def _drift(self, state: ModelState, records, resp, to_learn, was_warm: bool, seen_before: int, model_key):
        """Drift records: one per change the detector finds in the learned rows' responsibilities, and
        a periodic one every `drift_every` learned records once the model is warm."""
        settings, model, detector = self.settings, state.model, state.detector
        drifts = []
        # answers of the provisional warm-up model say nothing about drift
        learned = (resp if to_learn.all() else resp[to_learn]) if was_warm else resp[:0]
        for event in detector.update_many(padded(learned, detector.n_components)) if learned.shape[0] else ():
            self.counters.drift_events += 1
            record = records[int(np.flatnonzero(to_learn)[event.index])]  # the event's learned row
            logger.info(
                "drift at %s%s: weights %s, reference %s",
                record.where(),
                f" (model {model_key})" if model_key is not None else "",
                event.weights,
                event.reference_weights,
            )
            drifts.append(
                schemas.drift_record(
                    record,
                    self.topics["drift"],
                    seen_before + event.index + 1,  # records learned up to the one where the drift showed
                    event.weights,
                    event.reference_weights,
                    event.distance,
                    True,
                    model_key,
                )
            )
        state.since_drift_record += int(to_learn.sum())
        # periodic drift record, once the detector has weights of its own (not its uniform start)
        if state.since_drift_record >= settings.drift_every and model.is_warm and len(detector):
            state.since_drift_record %= settings.drift_every
            drifts.append(
                schemas.drift_record(
                    records[-1],
                    self.topics["drift"],
                    model.n_seen,
                    detector.weights_.tolist(),
                    detector.reference_weights_.tolist(),
                    detector.distance,
                    False,
                    model_key,
                )
            )
        return drifts


def offset_list(offsets: dict[Partition, int]) -> list[PartitionOffset]:
    return [PartitionOffset(topic=t, partition=p, offset=o) for (t, p), o in sorted(offsets.items())]


def padded(resp: np.ndarray, width: int) -> np.ndarray:
    """A one-component model still feeds a two-component detector (the second column stays 0)."""
    if resp.shape[1] == width:
        return resp
    return np.hstack([resp, np.zeros((resp.shape[0], width - resp.shape[1]))])


class WarmUpAnswers:
    """Rows that cold models answered and learned (`Learner.answer_warm_ups`), whose assignment records
    are built in one call: the answers of all the models answered together, and which rows of them
    each learned model's are."""

    def __init__(self, responsibilities: np.ndarray, log_likelihoods: np.ndarray, predictions):
        self.answers = (responsibilities, log_likelihoods, predictions)
        self.groups: list[tuple] = []  # (positions in the poll, records, model key, rows, n_seen before, refused)

    def add(self, positions, records, key: str, rows: tuple[int, int], seen_before: int, refused: dict) -> None:
        self.groups.append((positions, records, key, rows, seen_before, refused))

    def build(self, topic: str) -> tuple[list[int], list, list, dict[int, str]]:
        """(positions in the poll, records, their assignment records, {position in records: reason} of
        those refused while learning)."""
        groups = self.groups
        positions = list(itertools.chain.from_iterable(group[0] for group in groups))
        records = list(itertools.chain.from_iterable(group[1] for group in groups))
        keys = list(itertools.chain.from_iterable(itertools.repeat(g[2], len(g[1])) for g in groups))
        n_seen = list(itertools.chain.from_iterable(range(g[4], g[4] + len(g[1])) for g in groups))
        refused, start = {}, 0
        for group in groups:
            if group[5]:
                refused.update({start + i: reason for i, reason in group[5].items()})
            start += len(group[1])
        responsibilities, log_likelihoods, predictions = self.answers
        if len(records) != len(log_likelihoods):  # some models' rows went elsewhere: take the others'
            rows = np.fromiter(itertools.chain.from_iterable(range(*g[3]) for g in groups), dtype=np.int64)
            responsibilities, log_likelihoods = responsibilities[rows], log_likelihoods[rows]
            predictions = None if predictions is None else predictions[rows]
        built = schemas.assignments(records, topic, responsibilities, log_likelihoods, n_seen, predictions, keys)
        return positions, records, built, refused
