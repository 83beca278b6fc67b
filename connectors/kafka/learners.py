"""What the consumer learns: one model for the instance, or one model per key.

A learner answers a poll batch (an assignment or a dead letter per record, drift
records), learns it, and says what to checkpoint. The consume loop
(`streamem_connectors.kafka.pipeline`) drives it the same way in both modes.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import orjson

from streamem_connectors.kafka.checkpoint import (
    Checkpoint,
    CheckpointError,
    ModelCheckpoint,
    is_warm_state,
    model_checkpoint,
    model_settings,
    restore_detector,
    restore_model,
)
from streamem_connectors.kafka.clients import input_positions
from streamem_connectors.kafka.learner import (
    Counters,
    Learner,
    ModelState,
    assign_and_screen,
    model_type,
    new_model,
    new_state,
)
from streamem_connectors.kafka.resume import check_missing, check_resume, refuse_or_reset, resumed_or_reset
from streamem_connectors.kafka.settings import ConsumerSettings

# assign_and_screen and new_model are the learners' building blocks; the benchmarks take them from here
__all__ = ["InstanceLearner", "KeyedLearner", "assign_and_screen", "new_model"]

logger = logging.getLogger(__name__)
Partition = tuple[str, int]


class InstanceLearner(Learner):
    """One model for this consumer instance, checkpointed under `<group>/<instance>` with its offsets."""

    def __init__(self, settings: ConsumerSettings, store):
        super().__init__(settings, store)
        self.state = new_state(settings)
        key, where = settings.checkpoint_key, store.where(settings.checkpoint_key)
        found = store.load_prefix(f"{settings.group_id}/")
        raw = found.get(key)
        if raw is None:
            others = {k: v for k, v in found.items() if k != key}
            resumed_or_reset(settings, lambda: check_missing(settings, where, input_positions(settings), others))
            return
        restored = resumed_or_reset(settings, lambda: self.restore_checkpoint(raw, where))
        if restored is None:
            return
        self.state, offsets, self.counters = restored
        self.book.advance(offsets)
        self.state.since_drift_record = self.counters.records_in % settings.drift_every
        logger.info(
            "resumed from checkpoint %s: %d records learned, offsets %s", where, self.state.model.n_seen, self.offsets
        )

    def restore_checkpoint(self, raw: bytes, where: str) -> tuple[ModelState, dict[Partition, int], Counters]:
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
        state = ModelState(
            restore_model(model_type(self.settings), checkpoint.model, where),
            restore_detector(checkpoint.detector, where),
        )
        return state, offsets, Counters(**checkpoint.counters.model_dump())

    def process(self, batch, decoded=None):
        """One output per input record, in order, then the drift records (`decoded`: the batch's values
        decoded already, if they are)."""
        outputs, decoded = self._decode(batch, decoded)
        drifts = []
        if decoded.good:
            # all valid: the batch as it came (a view's assignments are built from its columns)
            records = batch if not decoded.errors else self.valid_records(batch, decoded)
            answered, drifts = self._answer(self.state, records, decoded.values, np.ones(len(records), dtype=bool))
            if not decoded.errors:  # an answer for each record, in order (a new list): the outputs as they are
                answered += drifts
                return answered
            for i, output in zip(decoded.good, answered, strict=True):
                outputs[i] = output
        return outputs + drifts

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        state = self.state
        document = self.instance_checkpoint(state.model.to_dict(), state.detector.to_dict())
        state.dirty = False
        return [(self.settings.checkpoint_key, document.dump())]

    def weights(self) -> list[float]:
        model = self.state.model
        return model.weights_.tolist() if model.is_warm else []


class KeyedLearner(Learner):
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
        self.models: dict[str, ModelState] = {}
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

    def _model(self, key: str) -> ModelState:
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
            state = new_state(self.settings)
        self.models[key] = state
        return state

    def _restore(self, raw: bytes, where: str, positions=None) -> ModelState:
        """A stored key model, checked; its learned-through offsets against `positions` when given (at start:
        a peer's checkpoint read later may be past the end the consumer saw then)."""
        document = ModelCheckpoint.parse(raw, where)
        warm = is_warm_state(document.model)
        through = check_resume(
            self.settings, where, document.settings, document.learned_through, positions, warm, "learned_through"
        )
        return ModelState(
            restore_model(model_type(self.settings), document.model, where),
            restore_detector(document.detector, where),
            through,
        )

    def process(self, batch, decoded=None):
        if self.stale:
            self.stored = self.store.load_prefix(self.prefix)
            self.stale = False
        outputs, decoded = self._decode(batch, decoded)
        batch = list(batch)  # read record by record below: made at once (a view would make each when asked)
        groups: dict[str, list[int]] = {}
        for j, key in enumerate(decoded.keys):
            groups.setdefault(str(key), []).append(j)
        drifts, cold, cold_members = [], [], []
        good, models = decoded.good, self.models
        for key, members in groups.items():
            state = models.get(key) or self._model(key)
            positions = members if not decoded.errors else [good[j] for j in members]
            records = [batch[i] for i in positions]
            through = state.learned_through
            learn = [r.offset >= through.get((r.topic, r.partition), 0) for r in records] if through else None
            if (learn is None or all(learn)) and self.can_answer_warm_up(state, len(records)):
                cold.append((key, state, records, positions))  # answered below, all the poll's cold models at once
                cold_members.append(members)
            else:
                to_learn = np.ones(len(records), dtype=bool) if learn is None else np.array(learn, dtype=bool)
                answered, key_drifts = self._answer(state, records, decoded.values[members], to_learn, model_key=key)
                drifts.extend(key_drifts)
                for i, output in zip(positions, answered, strict=True):
                    outputs[i] = output
            for r in records:
                tp = (r.topic, r.partition)
                if r.offset >= through.get(tp, 0):
                    through[tp] = r.offset + 1
        if cold:
            values = decoded.values[list(itertools.chain.from_iterable(cold_members))]
            learned, others = self.answer_warm_ups(cold, values)
            for positions, answered, key_drifts in others:
                drifts.extend(key_drifts)
                for i, output in zip(positions, answered, strict=True):
                    outputs[i] = output
            if learned.groups:
                positions, records, built, refused = learned.build(self.topics["assignments"])
                for i, output in zip(positions, built, strict=True):
                    outputs[i] = output
                self.counters.assigned += len(records) - len(refused)
                for i, dead in zip(positions, self._dead_letters(records, refused), strict=True):
                    if dead is not None:
                        outputs[i] = dead
        return outputs + drifts

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        entries, settings = [], orjson.Fragment(orjson.dumps(model_settings(self.settings)))  # once for all keys
        for key, state in self.models.items():
            if not state.dirty:
                continue
            # every record of the model's partitions up to the consumer's position is learned
            through = {tp: max(offset, self.offsets.get(tp, 0)) for tp, offset in state.learned_through.items()}
            state.learned_through = through
            document = model_checkpoint(key, state.model.to_dict(), state.detector.to_dict(), through, settings)
            entries.append((self.prefix + key, document))
            state.dirty = False
        return [*entries, (self.settings.checkpoint_key, self.instance_checkpoint().dump())]  # offsets and counters

    def weights(self) -> list[float]:
        return []  # one set per key: see the drift topic

