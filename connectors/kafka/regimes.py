"""The consumer with `--model hmm`: a hidden Markov model per instance, one filter per partition, or
per key with `--model-key` (with `--target`, a Markov-switching regression whose assignments carry
the forecast of y).

The records of a partition are one sequence: each is answered with the filtered probability of
every hidden state given its partition's records up to it (`OnlineGaussianHMM.filter_and_learn`,
which answers and learns in one pass), and the parameters, shared by the partitions, learn block
by block. When a partition's most likely state changes and holds with probability at least
`--regime-threshold`, a `regime_change` record goes to the drift topic. The checkpoint holds every
partition's filter and open block (in the model's state) and the regime last announced on each
partition, with the offsets they are at: a restart resumes every filter where its partition was.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from streamem.outliers import TOO_LARGE
from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.checkpoint import Checkpoint, CheckpointError
from streamem_connectors.kafka.learners import InstanceLearner
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["RegimeLearner", "checked_regimes", "stream_name"]

logger = logging.getLogger(__name__)


def stream_name(topic: str, partition: int) -> str:
    """The model's name for a partition's sequence (Kafka topic names hold no '/')."""
    return f"{topic}/{partition}"


def checked_regimes(regimes: dict[str, int] | None, K: int, where: str) -> dict[str, int]:
    """A checkpoint's regimes (the state last announced on each stream), each one of the K states."""
    for stream, state in (regimes or {}).items():
        if not 0 <= state < K:
            raise CheckpointError(f"checkpoint {where}: field 'regimes': state {state} of {stream!r} is not one "
                                  f"of the model's {K} states")
    return dict(regimes or {})


class RegimeLearner(InstanceLearner):
    """One hidden Markov model for this instance; each partition is a sequence of its own."""

    def __init__(self, settings: ConsumerSettings, store):
        self.regimes: dict[str, int] = {}  # stream -> the state last announced (before the checkpoint loads)
        self.refused_in_a_row: dict[str, int] = {}  # stream -> outliers refused since its last answered record
        super().__init__(settings, store)

    def restore_checkpoint(self, raw: bytes, where: str):
        restored = super().restore_checkpoint(raw, where)
        self.regimes = checked_regimes(Checkpoint.parse(raw, where).regimes, self.settings.n_components, where)
        return restored

    def process(self, batch, decoded=None):
        """One output per input record, in order (an assignment or a dead letter), then the drift and
        regime_change records."""
        outputs, decoded = self._decode(batch, decoded)
        if not decoded.good:
            return outputs
        records = self.valid_records(batch, decoded)
        X, target = self.model_columns(self.state, decoded.values)
        if target is not None:  # a Markov-switching regression learns rows [x..., y]
            X = np.column_stack([X, target])
        keys = None if decoded.keys is None else [str(key) for key in decoded.keys]
        answered, others = self._answer_sequences(records, X, keys)
        for i, output in zip(decoded.good, answered, strict=True):
            outputs[i] = output
        return outputs + others

    def _answer_sequences(self, records, X: np.ndarray, keys: list[str] | None = None):
        """Answer and learn each partition's records (each key's, with --model-key) as its sequence, but
        those refused (a dead letter each: too large, too far from every state, or a poll the model could
        not learn); drift and regime_change records after."""
        state, model = self.state, self.state.model
        n = len(records)
        seen_before, was_warm = model.n_seen, model.is_warm
        if keys is None:
            streams = [stream_name(record.topic, record.partition) for record in records]
        else:  # a key's records share a partition (the messages are keyed by it): one sequence per key
            streams = keys
        probabilities, log_likelihood = np.zeros((n, model.n_states)), np.zeros(n)
        forecasts = None if self.settings.target is None else np.zeros(n)
        reasons: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for i, stream in enumerate(streams):  # each sequence's rows, in their order, in one pass
            groups.setdefault(stream, []).append(i)
        for stream, members in groups.items():
            rows = np.asarray(members, dtype=np.int64)
            refused = self._screen(stream, X[rows])
            reasons.update({int(rows[i]): reason for i, reason in refused.items()})
            if refused:
                rows = np.delete(rows, list(refused))
            if not rows.size:
                continue
            try:
                answers = self._filter(stream, [records[i] for i in rows.tolist()], X[rows])
                probabilities[rows], log_likelihood[rows] = answers[:2]
                if forecasts is not None:
                    forecasts[rows] = answers[2]
            except ValueError as error:  # all or nothing: the model is as it was; the rows are not lost
                reasons.update({int(i): f"the model could not learn this poll's records of {stream}: {error}"
                                for i in rows})
        outputs = self._dead_letters(records, reasons)
        answered = np.ones(n, dtype=bool)
        answered[list(reasons)] = False
        kept = np.flatnonzero(answered)
        for key, rows in ([(None, kept)] if keys is None else self._by_key(keys, kept)):
            made = schemas.assignments(
                [records[i] for i in rows],
                self.topics["assignments"],
                probabilities[rows],
                log_likelihood[rows],
                seen_before + int(rows[0]) if keys is not None and rows.size else seen_before,
                None if forecasts is None else forecasts[rows],
                key,
            )
            for i, output in zip(rows.tolist(), made, strict=True):
                outputs[i] = output
        self.counters.assigned += kept.size
        drifts = self._drift(state, records, probabilities, answered, was_warm, seen_before, None)
        changes = self._regime_changes(records, streams, probabilities, answered, seen_before)
        state.dirty = True
        return outputs, drifts + changes

    def _filter(self, stream: str, records, rows: np.ndarray) -> tuple:
        """Answer and learn a sequence's rows: (filtered probabilities, log-likelihoods[, forecasts])."""
        model = self.state.model
        if self.settings.target is None:
            return model.filter_and_learn(rows, stream=stream)
        return model.forecast_and_learn(rows, stream=stream)

    @staticmethod
    def _by_key(keys: list[str], rows: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The rows of each key, in order (assignments carry their model key)."""
        groups: dict[str, list[int]] = {}
        for i in rows.tolist():
            groups.setdefault(keys[i], []).append(i)
        return [(key, np.asarray(members, dtype=np.int64)) for key, members in groups.items()]

    def _screen(self, stream: str, rows: np.ndarray) -> dict[int, str]:
        """{row: reason} of the rows to refuse: a value too large for the model's arithmetic, or a squared
        distance from every state beyond --outlier-threshold. A partition whose last --batch-size screened
        records were all refused has moved: from then on its records are learned (one WARNING)."""
        names = [*self.state.model.features_, *([self.settings.target] if self.settings.target else [])]
        magnitude = np.abs(rows).max(axis=1)
        reasons = {}
        for i in np.flatnonzero(magnitude >= TOO_LARGE).tolist():
            j = int(np.argmax(np.abs(rows[i])))
            reasons[i] = f"outlier: {names[j]!r} is {rows[i, j]:.3g}, too large for the model's statistics " \
                         f"(|x| >= {TOO_LARGE:.0e})"
        threshold = self.settings.outlier_threshold
        if math.isinf(threshold):
            return reasons
        fine = np.flatnonzero(magnitude < TOO_LARGE)
        distances = np.zeros(rows.shape[0])
        distances[fine] = self.state.model.outlier_distances(rows[fine])
        far = distances > threshold
        run = self.refused_in_a_row.get(stream, 0)
        if not far.any():
            self.refused_in_a_row[stream] = 0
            return reasons
        for i in range(rows.shape[0]):
            if not far[i]:
                run = 0
                continue
            run += 1
            if run > self.settings.batch_size:  # not outliers: the partition's stream has moved
                if run == self.settings.batch_size + 1:
                    logger.warning("%s: the last %d records were all far from every state; the stream has moved, "
                                   "learning its records again", stream, self.settings.batch_size)
                continue
            reasons[i] = (f"outlier: squared distance {distances[i]:.3g} from the closest state "
                          f"(threshold {threshold:.3g})")
        self.refused_in_a_row[stream] = run
        return reasons

    def _regime_changes(
        self, records, streams: list[str], probabilities: np.ndarray, answered: np.ndarray, seen_before: int
    ) -> list:
        """A regime_change record wherever a partition's most likely state changes to one held with
        probability >= --regime-threshold (among the records answered)."""
        threshold = self.settings.regime_threshold
        likely = probabilities.argmax(axis=1)
        held = (probabilities[np.arange(len(records)), likely] >= threshold) & answered
        changes = []
        for i in np.flatnonzero(held).tolist():
            stream, state = streams[i], int(likely[i])
            previous = self.regimes.get(stream)
            if previous == state:
                continue
            self.regimes[stream] = state
            record = records[i]
            logger.info("regime change at %s: state %s -> %d (p=%.3f)", record.where(), previous, state,
                        probabilities[i, state])
            changes.append(
                schemas.regime_change_record(
                    record,
                    self.topics["drift"],
                    seen_before + i + 1,
                    previous,
                    state,
                    probabilities[i].tolist(),
                    None if self.settings.model_key is None else stream,
                )
            )
        return changes

    def checkpoint_entries(self) -> list[tuple[str, bytes]]:
        state = self.state
        document = self.instance_checkpoint(state.model.to_dict(), state.detector.to_dict(), regimes=self.regimes)
        state.dirty = False
        return [(self.settings.checkpoint_key, document.dump())]

    def weights(self) -> list[float]:
        """The chain's stationary distribution: the share of time it spends in each state."""
        transmat = self.state.model.transmat_
        if transmat is None:
            return []
        K = transmat.shape[0]
        system = np.vstack([transmat.T - np.eye(K), np.ones((1, K))])
        stationary = np.linalg.lstsq(system, np.r_[np.zeros(K), 1.0], rcond=None)[0]
        return np.clip(stationary, 0.0, 1.0).tolist()
