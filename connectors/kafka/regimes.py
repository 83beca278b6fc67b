"""The consumer with `--model hmm`: a hidden Markov model per instance, one filter per partition
(with `--target`, a Markov-switching regression whose assignments carry the forecast of y).

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

import numpy as np

from streamem.outliers import TOO_LARGE
from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.checkpoint import Checkpoint, CheckpointError
from streamem_connectors.kafka.learners import InstanceLearner
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = ["RegimeLearner", "stream_name"]

logger = logging.getLogger(__name__)


def stream_name(topic: str, partition: int) -> str:
    """The model's name for a partition's sequence (Kafka topic names hold no '/')."""
    return f"{topic}/{partition}"


class RegimeLearner(InstanceLearner):
    """One hidden Markov model for this instance; each partition is a sequence of its own."""

    def __init__(self, settings: ConsumerSettings, store):
        self.regimes: dict[str, int] = {}  # stream -> the state last announced (before the checkpoint loads)
        super().__init__(settings, store)

    def restore_checkpoint(self, raw: bytes, where: str):
        restored = super().restore_checkpoint(raw, where)
        regimes = Checkpoint.parse(raw, where).regimes or {}
        K = self.settings.n_components
        for stream, state in regimes.items():
            if not 0 <= state < K:
                raise CheckpointError(f"checkpoint {where}: field 'regimes': state {state} of {stream!r} is not one "
                                      f"of the model's {K} states")
        self.regimes = dict(regimes)
        return restored

    def process(self, batch):
        """One output per input record, in order (an assignment or a dead letter), then the drift and
        regime_change records."""
        outputs, decoded = self._decode(batch)
        if not decoded.good:
            return outputs
        records = batch if not decoded.errors else [batch[i] for i in decoded.good]
        X, target = self.model_columns(self.state, decoded.values)
        if target is not None:  # a Markov-switching regression learns rows [x..., y]
            X = np.column_stack([X, target])
        too_large = np.abs(X).max(axis=1) >= TOO_LARGE
        if too_large.any():  # beyond the model's arithmetic (squares overflow): never learned
            refused = self._dead_letters(records, {int(i): self._too_large(X[i]) for i in np.flatnonzero(too_large)})
            for i, dead in zip(decoded.good, refused, strict=True):
                outputs[i] = dead if dead is not None else outputs[i]
            keep = ~too_large
            good = [i for i, k in zip(decoded.good, keep, strict=True) if k]
            records, X = [r for r, k in zip(records, keep, strict=True) if k], X[keep]
        else:
            good = decoded.good
        if not records:
            return outputs
        answered, others = self._answer_sequences(records, X)
        for i, output in zip(good, answered, strict=True):
            outputs[i] = output
        return outputs + others

    def _too_large(self, row: np.ndarray) -> str:
        j = int(np.argmax(np.abs(row)))
        name = [*self.state.model.features_, self.settings.target][j]
        return f"outlier: {name!r} is {row[j]:.3g}, too large for the model's statistics (|x| >= {TOO_LARGE:.0e})"

    def _answer_sequences(self, records, X: np.ndarray):
        """Answer and learn each partition's records as its sequence; drift and regime records after."""
        state, model = self.state, self.state.model
        n = len(records)
        seen_before, was_warm = model.n_seen, model.is_warm
        streams = [stream_name(record.topic, record.partition) for record in records]
        probabilities, log_likelihood = np.empty((n, model.n_states)), np.empty(n)
        forecasts = None if self.settings.target is None else np.empty(n)
        for stream in dict.fromkeys(streams):  # each partition's rows, in their order
            rows = np.fromiter((i for i, s in enumerate(streams) if s == stream), dtype=np.int64)
            if forecasts is None:
                probabilities[rows], log_likelihood[rows] = model.filter_and_learn(X[rows], stream=stream)
            else:
                probabilities[rows], log_likelihood[rows], forecasts[rows] = model.forecast_and_learn(
                    X[rows], stream=stream
                )
        answered = schemas.assignments(
            records, self.topics["assignments"], probabilities, log_likelihood, seen_before, forecasts
        )
        self.counters.assigned += n
        everything = np.ones(n, dtype=bool)
        drifts = self._drift(state, records, probabilities, everything, was_warm, seen_before, None)
        state.dirty = True
        return answered, drifts + self._regime_changes(records, streams, probabilities, seen_before)

    def _regime_changes(self, records, streams: list[str], probabilities: np.ndarray, seen_before: int) -> list:
        """A regime_change record wherever a partition's most likely state changes to one held with
        probability >= --regime-threshold."""
        threshold = self.settings.regime_threshold
        likely = probabilities.argmax(axis=1)
        held = probabilities[np.arange(len(records)), likely] >= threshold
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
                    record, self.topics["drift"], seen_before + i + 1, previous, state, probabilities[i].tolist()
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
