"""What every model family shares: sufficient statistics that add, scale and re-centre.

A family is defined by its expected sufficient statistics (what the E-step sums over
records; the M-step maps them to parameters in closed form). Batch EM,
stepwise EM, checkpoints and merging workers all manipulate these objects and never
look inside a family's parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Protocol

import numpy as np

__all__ = [
    "SufficientStatistics",
    "Summary",
    "Family",
    "check_statistics_fit",
    "log_responsibilities",
    "responsibilities",
]

# Added to every component's responsibility mass before dividing by it, as
# scikit-learn does: a component that received no mass keeps finite parameters.
MASS_FLOOR = 10 * np.finfo(np.float64).eps


@dataclasses.dataclass(frozen=True)
class SufficientStatistics:
    """Base of each family's statistics: array fields that add and scale.

    Every field except `shift` is additive over records. `shift` is the point the
    moments are taken about; two statistics with different shifts are brought to
    a common one (`recentred`) before they are added, which is exact algebra.
    """

    shift: np.ndarray

    def _additive_fields(self) -> tuple[str, ...]:
        return _additive_field_names(type(self))

    def recentred(self, shift: np.ndarray) -> SufficientStatistics:  # pragma: no cover - abstract
        raise NotImplementedError

    def __add__(self, other: SufficientStatistics) -> SufficientStatistics:
        if type(other) is not type(self):
            return NotImplemented
        if not np.array_equal(other.shift, self.shift):
            other = other.recentred(self.shift)
        return dataclasses.replace(
            self, **{name: getattr(self, name) + getattr(other, name) for name in self._additive_fields()}
        )

    def relabelled(self, order) -> SufficientStatistics:
        """The statistics with component k taken from component `order[k]` (every additive field holds
        its components first)."""
        return dataclasses.replace(self, **{name: getattr(self, name)[order] for name in self._additive_fields()})

    def scaled(self, factor: float) -> SufficientStatistics:
        """The statistics multiplied by `factor` (a step size or 1 / n_records)."""
        return type(self)(shift=self.shift, **{name: getattr(self, name) * factor for name in self._additive_fields()})

    def blend(self, batch: SufficientStatistics, step_size: float, batch_scale: float = 1.0) -> SufficientStatistics:
        """Stepwise-EM update `(1 - step_size) * self + step_size * batch_scale * batch` (one new object).

        `batch_scale` turns a batch's sums into per-record statistics (1 / n_records) on the way.
        """
        if batch.shift is not self.shift and not np.array_equal(batch.shift, self.shift):
            batch = batch.recentred(self.shift)
        keep, take = 1.0 - step_size, step_size * batch_scale
        fields = {name: keep * getattr(self, name) + take * getattr(batch, name) for name in self._additive_fields()}
        return type(self)(shift=self.shift, **fields)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @property
    def count(self) -> float:
        """How many records the statistics summarise (their total responsibility mass)."""
        return float(self.mass.sum())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every field, by name."""
        return {name: np.shape(value) for name, value in self.to_arrays().items()}

    # -- JSON: the one serialiser of statistics (model state, fit documents, the statistics log) --
    def to_dict(self) -> dict:
        """The statistics as a JSON-ready dict: `type` (the class name), then each field as nested lists.

        Examples
        --------
        >>> import numpy as np, streamem as se
        >>> X = np.random.default_rng(0).normal(size=(100, 2))
        >>> stats = se.GaussianMixture(2, random_state=0).fit(X).summarize(X).statistics
        >>> again = type(stats).from_dict(stats.to_dict())
        >>> round(again.count), all(np.array_equal(a, b) for a, b in zip(again.to_arrays().values(),
        ...                                                            stats.to_arrays().values()))
        (100, True)
        """
        return {"type": type(self).__name__, **{name: value.tolist() for name, value in self.to_arrays().items()}}

    @classmethod
    def from_dict(cls, document) -> SufficientStatistics:
        """Statistics from `to_dict()` output (a dict or its JSON text), checked before use.

        Every field must be present, finite, of shapes that agree with each other (components
        from `mass`, width from `shift`), and the sums of squares positive semi-definite;
        otherwise `streamem.state.StateError` names the field. `type`, when given, must be this
        class's name (documents written before it existed have none).
        """
        from streamem.state import StateError, checked_statistics, json_object

        document = json_object(document, "statistics")
        kind = document.get("type", cls.__name__)
        if kind != cls.__name__:
            raise StateError(f"statistics of type {kind!r}, expected {cls.__name__!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(document) - {"type", *names})
        if unknown:
            raise StateError(f"statistics have unknown field {unknown[0]!r}; expected {names}")
        missing = [name for name in names if name not in document]
        if missing:
            raise StateError(f"statistics field {missing[0]!r} is missing")
        for name in ("mass", "shift"):
            value = document.get(name)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value or [None])
            if not isinstance(value, list) or not value or not numbers:
                raise StateError(f"statistics field {name!r} must be a non-empty list of numbers")
        shapes = cls.field_shapes(len(document["mass"]), len(document["shift"]), document)
        stats = cls(**checked_statistics(document, shapes))
        stats.check_moments()
        return stats

    def check_moments(self) -> None:
        """Raise `streamem.state.StateError` unless the fields together could be moments of weighted
        records (each component's [[mass, first'], [first, second]] positive semi-definite): fields
        that pass one by one can still describe no data (a first moment scaled by 1000)."""
        raise NotImplementedError  # pragma: no cover - each family's statistics say

    @classmethod
    def field_shapes(cls, n_components: int, width: int, document: dict | None = None) -> dict[str, tuple[int, ...]]:
        """The shape of every field for `n_components` components about a shift of `width` values
        (`document`: the fields at hand, where the family allows more than one layout)."""
        raise NotImplementedError  # pragma: no cover - each family's statistics say


def check_statistics_fit(statistics, owner: str, expected_type: type, expected_shapes: dict) -> None:
    """ValueError unless `statistics` can be learned by `owner` (a model's name): of `expected_type`,
    of `expected_shapes`, finite, summarising at least one record, with no negative mass."""
    if not isinstance(statistics, expected_type):
        raise ValueError(f"{owner} learns {expected_type.__name__}, got {type(statistics).__name__}")
    arrays = statistics.to_arrays()
    if {name: value.shape for name, value in arrays.items()} != expected_shapes:
        raise ValueError(f"statistics of shapes {statistics.shapes} do not fit this model's {expected_shapes}")
    # one sum per field: a NaN or an infinity anywhere makes it non-finite (so would finite values near 1e308)
    if not np.isfinite(sum(float(np.add.reduce(value, axis=None)) for value in arrays.values())):
        raise ValueError("statistics must be finite")
    if not statistics.count > 0 or np.any(statistics.mass < 0):
        raise ValueError("statistics must summarise at least one record (count > 0, no negative mass)")


class Summary(NamedTuple):
    """What one E-step says about a batch of records (`model.summarize(X[, y])`).

    responsibilities: (n, K) p(component k | record); log_likelihood: (n,) each record's
    log-density under the model; statistics: the batch's expected sufficient statistics, sums
    over its records (`statistics.count` of them), ready for `model.apply`.
    """

    responsibilities: np.ndarray
    log_likelihood: np.ndarray
    statistics: SufficientStatistics


@functools.cache
def _additive_field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "shift")


class Family(Protocol):
    """What a model family provides; the engines use nothing else.

    `prepare` centres records on a shift; the E-step is `weighted_log_prob` (log w_k +
    log p(x | k), (n, K)), `e_step` (log-likelihood (n,), log responsibilities) and
    `expected_stats` (both, plus the batch's statistics; it also handles missing
    features where the family can); the M-step turns statistics into parameters.
    """

    param_fields: tuple[str, ...]

    def prepare(self, *data, shift=None): ...

    def weighted_log_prob(self, batch, params) -> np.ndarray: ...

    def e_step(self, batch, params) -> tuple[np.ndarray, np.ndarray]: ...

    def expected_stats(self, batch, params) -> tuple[np.ndarray, np.ndarray, SufficientStatistics]: ...

    def suff_stats(self, batch, resp: np.ndarray) -> SufficientStatistics: ...

    def m_step(self, stats: SufficientStatistics): ...

    def make_params(self, *fields): ...


def log_responsibilities(weighted_log_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-sum-exp once: per-sample log-likelihood (n,) and log responsibilities (n, K).

    `weighted_log_prob` is log w_k + log p(x | k), shape (n, K). Subtracting each
    row's maximum first means no exponential overflows or underflows to 0/0.
    """
    log_norm = _log_norm(weighted_log_prob)[0]
    return log_norm, weighted_log_prob - log_norm[:, None]


def responsibilities(weighted_log_prob: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample log-likelihood (n,) and responsibilities (n, K), from one exponential pass.

    The engines' hot path: it avoids a second `exp` over (n, K). Overwrites nothing
    the caller keeps (works on a fresh array, or on `out`, (n, K), where batch EM
    gathers every chunk's responsibilities: no copy).
    """
    log_norm, resp, sums = _log_norm(weighted_log_prob, out)
    resp *= (1.0 / sums)[:, None]
    return log_norm, resp


def _log_norm(weighted_log_prob: np.ndarray, out: np.ndarray | None = None):
    top = np.maximum.reduce(weighted_log_prob, axis=1)  # the ufunc: .max() adds a Python wrapper
    # A row whose maximum is -inf cannot occur: the weights sum to 1, so at least one
    # component has a finite log-weight, and every log-density here is finite.
    scaled = np.subtract(weighted_log_prob, top[:, None], out=out)
    np.exp(scaled, out=scaled)
    sums = scaled @ np.ones(scaled.shape[1])  # faster than .sum(axis=1) for small K
    return np.log(sums) + top, scaled, sums
