"""What the consumer learns: one model for the instance, or one model per key.

A learner answers a poll batch (an assignment or a dead letter per record, drift
records), learns it, and says what to checkpoint. The consume loop
(`streamem_connectors.kafka.pipeline`) drives it the same way in both modes.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pandas as pd

import streamem as se
from streamem.drift import WeightDriftDetector
from streamem.schedules import StepSize
from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.checkpoint import (
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointError,
    ModelCheckpoint,
    PartitionOffset,
    is_warm_state,
    model_settings,
    restore_detector,
    restore_model,
)
from streamem_connectors.kafka.clients import input_positions
from streamem_connectors.kafka.resume import check_missing, check_resume, refuse_or_reset, resumed_or_reset
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["Counters", "InstanceLearner", "KeyedLearner", "OffsetBook", "make_learner"]

logger = logging.getLogger(__name__)
Partition = tuple[str, int]


@dataclasses.dataclass
class Counters:
    """Totals over every run; a checkpoint holds exactly these names (`checkpoint.CountersDocument`)."""

    records_in: int = 0
    assigned: int = 0
    dead_lettered: int = 0
    drift_events: int = 0


def make_learner(settings: ConsumerSettings, store):
    if settings.replicate:
        from streamem_connectors.kafka.replication import ReplicatedLearner

        return ReplicatedLearner(settings, store)
    return KeyedLearner(settings, store) if settings.model_key else InstanceLearner(settings, store)


def new_model(settings: ConsumerSettings):
    step = StepSize(alpha=settings.step_alpha, eta_min=settings.step_floor)
    common = dict(batch_size=settings.batch_size, step=step, warmup=settings.warmup, seed=settings.seed)
    common.update(outliers="skip", outlier_threshold=outlier_threshold(settings))
    if settings.target is not None:
        return se.OnlineRegressionMixture(settings.n_components, **common)
    return se.OnlineGMM(
        settings.n_components, covariance_type=settings.covariance_type, features=tuple(settings.features), **common
    )


def outlier_threshold(settings: ConsumerSettings) -> float | None:
    """The library's threshold for --outlier-threshold (inf: no distance rule, None in the library)."""
    return None if math.isinf(settings.outlier_threshold) else settings.outlier_threshold


def assign_and_screen(model, settings: ConsumerSettings, frame: pd.DataFrame, target=None):
    """(responsibilities, log-likelihoods, predictions or None, `OutlierScreen`) of a batch under
    this run's threshold, from one E-step (the distances come from the same log-densities).

    The consumer dead-letters the rows the screen refuses instead of answering them; the model
    itself skips (never raises on) any it would still refuse while learning, so a refusal can
    never stop the consumer.
    """
    model.set_outlier_rule("skip", outlier_threshold(settings))  # a restored model keeps its own otherwise
    if target is None:
        responsibilities, log_likelihood, screened = model.assign_and_screen_many(frame)
        return responsibilities, log_likelihood, None, screened
    return model.assign_and_screen_many(frame, target)


def _model_type(settings: ConsumerSettings):
    return se.OnlineRegressionMixture if settings.target is not None else se.OnlineGMM


@dataclasses.dataclass
class _Model:
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


class _Learner:
    """Common parts; subclasses answer, learn and say what to checkpoint.

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
        self.counters = Counters()
        self.book = OffsetBook(forget_lost=self.forgets_lost)

    def _decode(self, batch) -> tuple[list, schemas.DecodedBatch]:
        """Decode a batch; the invalid records' dead letters go in their places in the outputs."""
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

    @staticmethod
    def _offer_outliers(model, frame: pd.DataFrame, target, offered: np.ndarray) -> np.ndarray:
        """Give the model the rows its screen refused (`offered`); True for those it learned after all."""
        taken = np.zeros(len(offered), dtype=bool)
        if not offered.any():
            return taken
        if target is None:
            model.learn_many(frame[offered])
        else:
            model.learn_many(frame[offered], target[offered])
        positions = np.flatnonzero(offered)
        taken[positions] = True
        taken[[int(positions[i]) for i, _ in model.skipped_]] = False
        return taken

    def _answer(self, state: _Model, records, values: np.ndarray, learn: np.ndarray, model_key=None, scored=None):
        """Score the rows with the model as it is (prequential), learn the rows marked in `learn`;
        a row the model's outlier guard refuses gets a dead letter instead, and is not learned.
        (`scored`: the rows' answers, already screened.)"""
        settings, model = self.settings, state.model
        d = len(settings.features)
        frame = pd.DataFrame(values[:, :d], columns=settings.features)
        target = None if settings.target is None else pd.Series(values[:, d])
        resp, log_likelihood, predictions, screened = scored or assign_and_screen(model, settings, frame, target)
        if screened is not None and screened.outlier.any():
            keep = ~screened.outlier
            answered, drifts = ([], [])
            if keep.any():
                kept = [record for record, good in zip(records, keep, strict=True) if good]
                answers = (resp[keep], log_likelihood[keep], None if predictions is None else predictions[keep], None)
                answered, drifts = self._answer(state, kept, values[keep], learn[keep], model_key, answers)
            # The refused rows still go to the model (which skips them): that is how it sees a stream
            # that has moved (most recent records refused) and warms up again from them; the rows it
            # then takes are answered, as the model as it was scored them, not dead-lettered.
            taken = self._offer_outliers(model, frame, target, screened.outlier & learn)
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
        if target is None:
            if learn.all():
                model.learn_many(frame)
            elif learn.any():
                model.learn_many(frame[learn])
        else:
            if learn.all():
                model.learn_many(frame, target)
            elif learn.any():
                model.learn_many(frame[learn], target[learn])
        # Refused while learning, by what the model became within this batch (its warm-up fit, or
        # the warm-up reference growing), though screened above: a dead letter instead of an answer.
        refused = {int(np.flatnonzero(learn)[i]): str(error) for i, error in model.skipped_} if learn.any() else {}
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
        if refused:
            for i, dead in enumerate(self._dead_letters(records, refused)):
                answered[i] = dead if dead is not None else answered[i]
            self.counters.assigned -= len(refused)
            learn = learn.copy()
            learn[list(refused)] = False
        drifts = []
        # answers of the provisional warm-up model say nothing about drift
        learned = (resp if learn.all() else resp[learn]) if was_warm else resp[:0]
        for event in state.detector.update_many(_padded(learned, state.detector.n_components)):
            self.counters.drift_events += 1
            record = [r for r, keep in zip(records, learn, strict=True) if keep][event.index]
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
        state.since_drift_record += int(learn.sum())
        if state.since_drift_record >= settings.drift_every and model.is_warm:  # periodic drift record
            state.since_drift_record %= settings.drift_every
            detector = state.detector
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
        state.dirty = True
        return answered, drifts


class InstanceLearner(_Learner):
    """One model for this consumer instance, checkpointed under `<group>/<instance>` with its offsets."""

    def __init__(self, settings: ConsumerSettings, store):
        super().__init__(settings, store)
        self.state = _Model(new_model(settings), WeightDriftDetector(max(2, settings.n_components)))
        key, where = settings.checkpoint_key, store.where(settings.checkpoint_key)
        found = store.load_prefix(f"{settings.group_id}/")
        raw = found.get(key)
        if raw is None:
            others = {k: v for k, v in found.items() if k != key}
            resumed_or_reset(settings, lambda: check_missing(settings, where, input_positions(settings), others))
            return
        restored = resumed_or_reset(settings, lambda: self._restore(raw, where))
        if restored is None:
            return
        self.state, offsets, self.counters = restored
        self.book.advance(offsets)
        self.state.since_drift_record = self.counters.records_in % settings.drift_every
        logger.info(
            "resumed from checkpoint %s: %d records learned, offsets %s", where, self.state.model.n_seen, self.offsets
        )

    def _restore(self, raw: bytes, where: str) -> tuple[_Model, dict[Partition, int], Counters]:
        """The model, offsets and counters of a checkpoint, each checked (CheckpointError otherwise)."""
        checkpoint = Checkpoint.parse(raw, where)
        positions = input_positions(self.settings)
        warm = is_warm_state(checkpoint.model)
        offsets = check_resume(self.settings, where, checkpoint.settings, checkpoint.offsets, positions, warm)
        for field in ("model", "detector"):
            if getattr(checkpoint, field) is None:
                raise CheckpointError(
                    f"checkpoint {where}: field {field!r} is null (written with --model-key or --replicate?)"
                )
        state = _Model(
            restore_model(_model_type(self.settings), checkpoint.model, where),
            restore_detector(checkpoint.detector, where),
        )
        return state, offsets, Counters(**checkpoint.counters.model_dump())

    def process(self, batch):
        outputs, decoded = self._decode(batch)
        drifts = []
        if decoded.good:
            records = batch if not decoded.errors else [batch[i] for i in decoded.good]
            answered, drifts = self._answer(self.state, records, decoded.values, np.ones(len(records), dtype=bool))
            for i, output in zip(decoded.good, answered, strict=True):
                outputs[i] = output
        return outputs + drifts

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        state = self.state
        document = Checkpoint(
            version=CHECKPOINT_VERSION,
            key=self.settings.checkpoint_key,
            model=state.model.to_dict(),
            detector=state.detector.to_dict(),
            offsets=_offset_list(self.offsets),
            counters=dataclasses.asdict(self.counters),
            settings=model_settings(self.settings),
        )
        state.dirty = False
        return [(self.settings.checkpoint_key, document.dump())]

    def weights(self) -> list[float]:
        model = self.state.model
        return model.weights_.tolist() if model.is_warm else []


class KeyedLearner(_Learner):
    """One model per value of the `model_key` field.

    A key's model lives with the partition that holds its records (producers key the
    messages by the same field). Each model is checkpointed under
    `<group>/model/<key>` with the next offset of each partition it has learned
    through. The consumer that takes a partition over reads those checkpoints;
    records below a model's learned-through offset are answered again but not
    learned again.
    """

    forgets_lost = True

    def __init__(self, settings: ConsumerSettings, store):
        super().__init__(settings, store)
        self.prefix = f"{settings.group_id}/model/"
        self.models: dict[str, _Model] = {}
        self.stored: dict[str, bytes] = {}
        self.stale = True  # stored checkpoints to be re-read before the next batch
        self.discarded: dict[str, bytes] = {}  # stored models refused at start that --reset-model starts fresh
        key, where = settings.checkpoint_key, store.where(settings.checkpoint_key)
        found = store.load_prefix(f"{settings.group_id}/")
        positions = input_positions(settings)
        self._check_stored_models(found, positions)
        raw = found.get(key)
        if raw is None:
            others = {k: v for k, v in found.items() if k != key}
            resumed_or_reset(settings, lambda: check_missing(settings, where, positions, others))
            return
        counters = resumed_or_reset(settings, lambda: self._counters(raw, where))
        if counters is not None:
            self.counters = counters

    def _check_stored_models(self, found: dict[str, bytes], positions) -> None:
        """Check every stored key model now (document, settings, learned-through offsets against the input),
        not when its key's first record comes in, hours into a run."""
        for name, raw in sorted(found.items()):
            if not name.startswith(self.prefix):
                continue
            where = self.store.where(name)
            try:
                self._restore(raw, where, positions)
            except CheckpointError as error:
                refuse_or_reset(self.settings, error, f"the model of key {name[len(self.prefix) :]!r} starts fresh")
                self.discarded[name] = raw

    def _counters(self, raw: bytes, where: str) -> Counters:
        checkpoint = Checkpoint.parse(raw, where)
        check_resume(self.settings, where, checkpoint.settings, [], None, warm=True)  # offsets are the models'
        return Counters(**checkpoint.counters.model_dump())

    def start_offsets(self, assigned: list[Partition]) -> dict[Partition, int]:
        """Drop what belongs to partitions that went elsewhere; resume kept ones where their models are.

        A dropped model's learning since its last checkpoint is discarded on purpose: the new owner
        restores that checkpoint and learns again from the committed offset, so nothing is learned
        twice. (Runs in the client's rebalance callback, so nothing here may block.)
        """
        resume, lost = self.book.resume(assigned)
        for key in [k for k, state in self.models.items() if set(state.learned_through) & lost]:
            del self.models[key]
        self.stale = True  # a previous owner may have just checkpointed models of our new partitions
        return resume

    def _model(self, key: str) -> _Model:
        state = self.models.get(key)
        if state is not None:
            return state
        raw = self.stored.get(self.prefix + key)
        state = None
        if raw is not None and raw != self.discarded.get(self.prefix + key):  # checked at start, or a peer's since
            state = resumed_or_reset(self.settings, lambda: self._restore(raw, self.store.where(self.prefix + key)))
            if state is not None:
                logger.info("model %s restored: %d records learned", key, state.model.n_seen)
        if state is None:
            state = _Model(new_model(self.settings), WeightDriftDetector(max(2, self.settings.n_components)))
        self.models[key] = state
        return state

    def _restore(self, raw: bytes, where: str, positions=None) -> _Model:
        """A stored key model, checked; its learned-through offsets against `positions` when given (at start:
        a peer's checkpoint read later may be past the end the consumer saw then)."""
        document = ModelCheckpoint.parse(raw, where)
        warm = is_warm_state(document.model)
        through = check_resume(
            self.settings, where, document.settings, document.learned_through, positions, warm, "learned_through"
        )
        return _Model(
            restore_model(_model_type(self.settings), document.model, where),
            restore_detector(document.detector, where),
            through,
        )

    def process(self, batch):
        if self.stale:
            self.stored = self.store.load_prefix(self.prefix)
            self.stale = False
        outputs, decoded = self._decode(batch)
        groups: dict[str, list[int]] = {}
        for j, key in enumerate(decoded.keys):
            groups.setdefault(str(key), []).append(j)
        drifts = []
        for key, members in groups.items():
            state = self._model(key)
            records = [batch[decoded.good[j]] for j in members]
            learn = np.array(
                [r.offset >= state.learned_through.get((r.topic, r.partition), 0) for r in records], dtype=bool
            )
            answered, key_drifts = self._answer(state, records, decoded.values[members], learn, model_key=key)
            drifts.extend(key_drifts)
            for j, output in zip(members, answered, strict=True):
                outputs[decoded.good[j]] = output
            for r in records:
                state.learned_through[(r.topic, r.partition)] = max(
                    state.learned_through.get((r.topic, r.partition), 0), r.offset + 1
                )
        return outputs + drifts

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        entries = []
        for key, state in self.models.items():
            if not state.dirty:
                continue
            # every record of the model's partitions up to the consumer's position is learned
            through = {tp: max(offset, self.offsets.get(tp, 0)) for tp, offset in state.learned_through.items()}
            state.learned_through = through
            document = ModelCheckpoint(
                version=CHECKPOINT_VERSION,
                model_key=key,
                model=state.model.to_dict(),
                detector=state.detector.to_dict(),
                learned_through=_offset_list(through),
                settings=model_settings(self.settings),
            )
            entries.append((self.prefix + key, document.dump()))
            state.dirty = False
        counters = Checkpoint(
            version=CHECKPOINT_VERSION,
            key=self.settings.checkpoint_key,
            model=None,
            detector=None,
            offsets=_offset_list(self.offsets),
            counters=dataclasses.asdict(self.counters),
            settings=model_settings(self.settings),
        )
        return [*entries, (self.settings.checkpoint_key, counters.dump())]

    def weights(self) -> list[float]:
        return []  # one set per key: see the drift topic


def _offset_list(offsets: dict[Partition, int]) -> list[PartitionOffset]:
    return [PartitionOffset(topic=t, partition=p, offset=o) for (t, p), o in sorted(offsets.items())]


def _padded(resp: np.ndarray, width: int) -> np.ndarray:
    """A one-component model still feeds a two-component detector (the second column stays 0)."""
    if resp.shape[1] == width:
        return resp
    return np.hstack([resp, np.zeros((resp.shape[0], width - resp.shape[1]))])
