"""A hidden Markov model's statistics and parameters: the chain's, beside its emission family's.

The emission statistics are the family's own (`GaussianStats`, `RegressionStats`), summed with
each record weighted by the posterior probability of each state instead of a mixture
responsibility; the emission M-step is the family's. Only the chain adds statistics: the expected
number of sequences starting in each state and of transitions between each pair of states.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from streamem.families.base import SufficientStatistics
from streamem.families.gaussian import GaussianStats
from streamem.families.regression import RegressionStats

__all__ = ["HMMStats", "ChainParams", "chain_m_step", "checked_chain", "pooled_for_dead", "DEAD_STATE_MASS"]

# A state whose expected number of records is below this was not visited: its emission
# parameters and its row of the transition matrix keep their previous values.
DEAD_STATE_MASS = 1e-8

_EMISSION_TYPES = {cls.__name__: cls for cls in (GaussianStats, RegressionStats)}


@dataclasses.dataclass(frozen=True)
class HMMStats:
    """Expected sufficient statistics of a hidden Markov model over some records.

    first: (K,) expected number of sequences starting in each state; transitions: (K, K) expected
    number of moves from state i to state j; emissions: the emission family's statistics with
    every record weighted by P(state k | the records). All three add over records and scale.
    """

    first: np.ndarray
    transitions: np.ndarray
    emissions: SufficientStatistics

    def __add__(self, other: HMMStats) -> HMMStats:
        if not isinstance(other, HMMStats):
            return NotImplemented
        emissions = self.emissions + other.emissions
        return HMMStats(self.first + other.first, self.transitions + other.transitions, emissions)

    def relabelled(self, order) -> HMMStats:
        """The statistics with state k taken from state `order[k]` (the same chain under other labels)."""
        order = np.asarray(order)
        return HMMStats(self.first[order], self.transitions[np.ix_(order, order)], self.emissions.relabelled(order))

    def scaled(self, factor: float) -> HMMStats:
        """The statistics multiplied by `factor`."""
        return HMMStats(self.first * factor, self.transitions * factor, self.emissions.scaled(factor))

    def blend(self, block: HMMStats, step_size: float, block_scale: float = 1.0) -> HMMStats:
        """Stepwise update `(1 - step_size) * self + step_size * block_scale * block` (one new object)."""
        keep, take = 1.0 - step_size, step_size * block_scale
        return HMMStats(
            keep * self.first + take * block.first,
            keep * self.transitions + take * block.transitions,
            self.emissions.blend(block.emissions, step_size, block_scale),
        )

    @property
    def count(self) -> float:
        """How many records the statistics summarise."""
        return self.emissions.count

    @property
    def shapes(self) -> dict:
        """The shape of every field, by name (the emissions' as a nested dict)."""
        return {"first": self.first.shape, "transitions": self.transitions.shape, "emissions": self.emissions.shapes}

    def to_dict(self) -> dict:
        """The statistics as a JSON-ready dict (`type`, `first`, `transitions`, `emissions`)."""
        return {
            "type": type(self).__name__,
            "first": self.first.tolist(),
            "transitions": self.transitions.tolist(),
            "emissions": self.emissions.to_dict(),
        }

    @classmethod
    def from_dict(cls, document) -> HMMStats:
        """Statistics from `to_dict()` output (a dict or its JSON text), checked before use:
        `streamem.state.StateError` names the first field that is missing, of the wrong shape,
        negative or not finite."""
        from streamem.state import StateError, json_object

        document = json_object(document, "statistics")
        if document.get("type", cls.__name__) != cls.__name__:
            raise StateError(f"statistics of type {document.get('type')!r}, expected {cls.__name__!r}")
        unknown = sorted(set(document) - {"type", "first", "transitions", "emissions"})
        if unknown:
            raise StateError(f"statistics have unknown field {unknown[0]!r}")
        for name in ("first", "transitions", "emissions"):
            if name not in document:
                raise StateError(f"statistics field {name!r} is missing")
        emissions_document = json_object(document["emissions"], "emissions")
        kind = _EMISSION_TYPES.get(emissions_document.get("type"))
        if kind is None:
            raise StateError(f"emission statistics of unknown type {emissions_document.get('type')!r}")
        emissions = kind.from_dict(emissions_document)
        n_states = emissions.mass.shape[0]
        first = _counts(document["first"], "first", (n_states,), StateError)
        transitions = _counts(document["transitions"], "transitions", (n_states, n_states), StateError)
        return cls(first, transitions, emissions)


def check_hmm_statistics(statistics, owner: str, emission_type: type, expected_shapes: dict) -> None:
    """ValueError unless `owner` (a model's name) can learn `statistics`: `HMMStats` with emission
    statistics of `emission_type`, of its shapes, summarising at least one record, with every field
    as records make them (what `from_dict` checks: finite, counts and masses not negative, sums of
    squares positive semi-definite). A model that applied others would hold parameters it could not save."""
    from streamem.state import StateError

    if not isinstance(statistics, HMMStats):
        raise ValueError(f"{owner} learns HMMStats, got {type(statistics).__name__}")
    if type(statistics.emissions) is not emission_type:
        raise ValueError(f"emission statistics {type(statistics.emissions).__name__} do not fit this model's "
                         f"{emission_type.__name__}")
    if statistics.shapes != expected_shapes:
        raise ValueError(f"statistics of shapes {statistics.shapes} do not fit this model's {expected_shapes}")
    try:
        HMMStats.from_dict(statistics.to_dict())
    except StateError as error:
        raise ValueError(str(error)) from None
    if not statistics.count > 0:
        raise ValueError("statistics must summarise at least one record")


def _counts(value, name: str, shape: tuple, error: type) -> np.ndarray:
    try:
        array = np.array(value, dtype=float)
    except (TypeError, ValueError):
        raise error(f"statistics field {name!r} must be numbers of shape {shape}") from None
    if array.shape != shape:
        raise error(f"statistics field {name!r} has shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise error(f"statistics field {name!r} must be finite and not negative")
    return array


@dataclasses.dataclass(frozen=True)
class ChainParams:
    """startprob (K,): P(first state); transmat (K, K): P(next state j | state i), rows sum to 1."""

    startprob: np.ndarray
    transmat: np.ndarray


def checked_chain(startprob, transmat, n_states: int) -> ChainParams:
    """ValueError unless `startprob` is K probabilities and `transmat` K rows of them."""
    start = np.asarray(startprob, dtype=float)
    if start.shape != (n_states,) or not np.all(np.isfinite(start)) or np.any(start < 0):
        raise ValueError(f"startprob must be {n_states} probabilities, got {startprob!r}")
    if not np.isclose(start.sum(), 1.0):
        raise ValueError(f"startprob must sum to 1, got {start.sum()}")
    matrix = np.asarray(transmat, dtype=float)
    if matrix.shape != (n_states, n_states) or not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise ValueError(f"transmat must be a ({n_states}, {n_states}) matrix of probabilities, got {transmat!r}")
    rows = matrix.sum(axis=1)
    if not np.allclose(rows, 1.0):
        raise ValueError(f"every row of transmat must sum to 1, got row sums {rows.tolist()}")
    return ChainParams(start, matrix)  # as given (not renormalised): a restored model must be bit for bit


def chain_m_step(stats: HMMStats, previous: ChainParams) -> ChainParams:
    """Maximum-likelihood start and transition probabilities from expected counts. A row with no
    expected transitions out (a state never visited but at the end) keeps its previous values,
    as does the start distribution when no sequence starts in the statistics."""
    first = stats.first
    total = float(np.add.reduce(first))
    startprob = first / total if total > 0 else previous.startprob
    rows = np.add.reduce(stats.transitions, axis=1)
    if min(rows.tolist()) > DEAD_STATE_MASS:  # the usual case: every state was left at least once
        return ChainParams(startprob, stats.transitions / rows[:, None])
    visited = rows > DEAD_STATE_MASS
    transmat = np.where(visited[:, None], stats.transitions / np.where(visited, rows, 1.0)[:, None], previous.transmat)
    return ChainParams(startprob, transmat)


def pooled_for_dead(emissions: SufficientStatistics, dead: np.ndarray) -> SufficientStatistics:
    """`emissions` with each dead state's statistics replaced by those of all records together, so
    the family's M-step gives it finite parameters (to be replaced by its previous ones) whatever
    the regularisation; the live states' statistics are untouched. Not for parameters the states
    share (a tied covariance), which the stand-in would change."""
    fields = {}
    for name in emissions._additive_fields():
        value = getattr(emissions, name)
        mask = dead.reshape((-1,) + (1,) * (value.ndim - 1))
        fields[name] = np.where(mask, value.sum(axis=0, keepdims=True), value)
    return dataclasses.replace(emissions, **fields)
