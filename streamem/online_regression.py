"""Online mixture of linear regressions: stepwise EM as a River mini-batch regressor."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
from river import base

from streamem._online import OnlineMixture
from streamem._validation import check_positive, check_target_value, frame_values, record_values
from streamem.families.base import MASS_FLOOR, responsibilities
from streamem.families.regression import RegressionFamily, RegressionStats
from streamem.outliers import DEFAULT_THRESHOLD, SPREAD, OutlierScreen
from streamem.regression_mixture import RegressionMixture
from streamem.schedules import StepSize
from streamem.state import parse_fit

__all__ = ["OnlineRegressionMixture"]


class OnlineRegressionMixture(OnlineMixture, base.MiniBatchRegressor):
    """Mixture of K linear regressions learned online by stepwise EM, as a River regressor.

    `y | z=k ~ N(b_k . [x, 1], s_k^2)`. The running statistics are each component's
    weighted normal equations; the M-step is one weighted least-squares solve per
    component. The first `warmup` records are fitted by batch EM
    (`streamem.RegressionMixture`), then every `batch_size` records make one
    stepwise update with step `eta_t = (t + t0) ** -alpha`.

    Features follow River's linear models: a feature missing from a record
    contributes nothing (it reads as 0), and a new feature extends the model with a
    zero coefficient (records before it count as 0 for it). NaN, inf, a
    non-number or a non-numeric target raise a `ValueError` / `TypeError` naming
    the feature, and the model is left unchanged.

    `predict_one` returns the mixture's conditional mean `sum_k w_k b_k . [x, 1]`;
    before the warm-up completes, the mean of the targets seen (0 before any).

    Parameters
    ----------
    n_components
        Number of regression lines K.
    batch_size, step, warmup, averaging, seed
        As in `OnlineGMM`.
    reg_noise
        Added to every noise variance after each M-step.
    outliers, outlier_threshold
        As in `OnlineGMM`. A record is an outlier when the squared distance of its target and
        features from their running means, in running variances (summed over the target and
        the features the model has seen away from 0), exceeds the threshold (default 1e6: 1000
        sd); during the warm-up, its robust distance from the buffered records' median.

    Attributes
    ----------
    weights_ : (K,)
    coef_ : (K, d), columns in the order of `feature_names_`
    intercept_ : (K,)
    noise_variance_ : (K,)
    n_seen : records learned so far
    n_outliers : records the outlier guard refused (raised or skipped)
    skipped_ : with outliers="skip", the (row position, OutlierError) of each record the last
        learn_one / learn_many call skipped

    Examples
    --------
    >>> import numpy as np
    >>> import streamem as se
    >>> rng = np.random.default_rng(0)
    >>> model = se.OnlineRegressionMixture(n_components=2, warmup=300, batch_size=50, seed=0)
    >>> for _ in range(6000):
    ...     x = rng.uniform(0, 10)
    ...     slope, intercept, noise = (0.5, 1.0, 0.1) if rng.random() < 0.5 else (1.5, 2.0, 0.2)
    ...     model.learn_one({"x": x}, slope * x + intercept + rng.normal(0, noise))
    >>> order = np.argsort(model.coef_[:, 0])
    >>> np.round(model.coef_[order, 0], 1).tolist(), np.round(model.intercept_[order], 1).tolist()
    ([0.5, 1.5], [1.0, 2.0])
    """

    def __init__(
        self,
        n_components: int = 2,
        batch_size: int = 128,
        step: StepSize | None = None,
        warmup: int = 500,
        reg_noise: float = 1e-6,
        averaging: int | None = None,
        seed: int | None = None,
        outliers: str = "raise",
        outlier_threshold: float | None = DEFAULT_THRESHOLD,
    ):
        self.n_components = n_components
        self.batch_size = batch_size
        self.step = step
        self.warmup = warmup
        self.reg_noise = reg_noise
        self.averaging = averaging
        self.seed = seed
        self.outliers = outliers
        self.outlier_threshold = outlier_threshold
        self._check_online_params()
        check_positive(reg_noise, "reg_noise")
        self._reset()

    @classmethod
    def _unit_test_params(cls):
        yield {"n_components": 2, "warmup": 20, "batch_size": 8, "seed": 42}
        yield {"n_components": 3, "warmup": 30, "batch_size": 4, "averaging": 3, "seed": 7}
        # the outlier guard skipping, with a threshold low enough to act on small test streams
        yield {
            "n_components": 2,
            "warmup": 20,
            "batch_size": 8,
            "seed": 5,
            "outliers": "skip",
            "outlier_threshold": 99.0,
        }

    def _reset(self) -> None:
        super()._reset()
        self.feature_names_: list = []
        self._index: dict = {}
        self._regression = RegressionFamily(self.reg_noise)
        self._rng = np.random.default_rng(self.seed)

    # -- hooks for OnlineMixture (buffer rows are [y, x_1, ..., x_d]) ------------------------
    def _family(self) -> RegressionFamily:
        return self._regression

    def _width(self) -> int:
        return 1 + len(self.feature_names_)

    def _prepare(self, rows: np.ndarray, shift):
        return self._regression.prepare(rows[:, 1:], rows[:, 0], shift)

    def _screen_names(self) -> tuple:
        return (None, *self.feature_names_)  # None: the target

    def _judged(self, rows: np.ndarray) -> np.ndarray:
        """A feature that reads 0 is not judged: 0 is what a feature absent from a record reads
        (River's convention), and an absent feature is no outlier; an absurd value is never 0."""
        if not rows.shape[1] > 1 or (rows[:, 1:] != 0).all():
            return rows
        judged = rows.copy()
        features = judged[:, 1:]
        features[features == 0] = np.nan
        return judged

    def _running_spread(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, variance floored at reg_noise, seen) of [target, features] from the running statistics."""
        stats = self._engine.stats
        d = stats.xy.shape[1] - 1
        total = max(stats.mass.sum(), MASS_FLOOR)
        offset = np.append(stats.xy[:, d].sum(), stats.xx[:, :d, d].sum(axis=0)) / total
        second = np.append(stats.yy.sum(), np.einsum("kjj->j", stats.xx[:, :d, :d])) / total
        variance = np.maximum(second - offset**2, self.reg_noise)
        return np.append(stats.shift[d], stats.shift[:d]) + offset, variance, second > 0

    def _ball(self, key):
        if isinstance(key, tuple):  # the warm-up reference
            return super()._ball(key)
        centre, variance, seen = self._running_spread()
        return centre, math.sqrt(self.outlier_threshold * float(variance[seen].min(initial=np.inf)))

    def _model_distances(self, rows: np.ndarray, batch=None, log_prob=None):
        """Per row: the squared distance of the target and features from their running means, in
        running variances (floored at reg_noise; a feature never seen away from 0 is not judged:
        a new one has no spread yet; nor is a 0, see `_judged`), the rule's tag, and the column
        most to blame (0: the target).

        Not the residual under the closest line: after a short warm-up a line can be wild (River's
        check, 20 records on 7 features: residuals of 1,700 on targets near 40, 2.9e12 noise
        variances away), and a residual rule would then refuse good records from a bad model for
        good, while it cannot learn its way out. The running spread judges the record, not the fit.
        """
        centre, variance, seen = self._running_spread()
        with np.errstate(over="ignore", invalid="ignore"):
            deviation = rows - centre
            squared = deviation * deviation / variance
        squared = np.where(seen & ~np.isnan(squared), squared, 0.0)
        return squared.sum(axis=1), SPREAD, squared.argmax(axis=1), None

    def _warm_up_params(self, rows: np.ndarray):
        batch_model = RegressionMixture(
            self.n_components,
            reg_noise=self.reg_noise,
            n_init=2,
            tol=1e-6,
            max_iter=300,
            init="quantiles",
            random_state=self._rng,
        )
        return batch_model.fit(rows[:, 1:], rows[:, 0])._params

    def _provisional_params(self, rows):
        K, d = self.n_components, len(self.feature_names_)
        targets = np.zeros(0) if rows is None else rows[:, 0]
        centre = float(targets.mean()) if targets.size else 0.0
        spread = float(targets.var()) if targets.size > 1 else 1.0
        return self._regression.make_params(
            np.full(K, 1.0 / K), np.zeros((K, d)), np.full(K, centre), np.full(K, spread if spread > 0 else 1.0)
        )

    # -- features -------------------------------------------------------------------------------
    def _learn_features(self, names) -> None:
        """Extend the model with features it has not seen: zero coefficients and statistics."""
        new = sorted((name for name in names if name not in self._index), key=str)
        if not new:
            return
        old_d = len(self.feature_names_)
        for name in new:
            self._index[name] = len(self.feature_names_)
            self.feature_names_.append(name)
        added = len(new)
        if self._buffer is not None:
            widened = np.zeros((self._buffer.shape[0], self._buffer.shape[1] + added))
            widened[:, : self._buffer.shape[1]] = self._buffer
            self._buffer = widened
        if self._pending is not None:  # pooled statistics gain the new features too
            self._pending = self._pending.widened(old_d, added)
        if self._engine is not None:
            self._engine.stats = self._engine.stats.widened(old_d, added)
            self._engine.params = self._regression.m_step(self._engine.stats)
            if self._engine.averaged is not None:
                averaged = self._engine.averaged
                self._engine.averaged = dataclasses.replace(
                    averaged, coef=np.hstack([averaged.coef, np.zeros((averaged.coef.shape[0], added))])
                )
        self._scorer = None
        self._reference = None

    def _row(self, x: dict, y) -> list:
        target = check_target_value(y)
        _check_record(x)
        self._learn_features(x)
        return [target] + [float(x.get(name, 0.0)) for name in self.feature_names_]

    def _features_of(self, x: dict) -> np.ndarray:
        """`x` in the model's feature order; unknown features are ignored, missing ones read 0."""
        _check_record(x)
        return np.array([float(x.get(name, 0.0)) for name in self.feature_names_])

    def add_features(self, names) -> None:
        """Give the model features before it sees them (zero coefficients and statistics), so arrays
        with those columns, in `feature_names_` order, can be summarised and learned."""
        with self._transaction():
            self._learn_features(list(names))

    def _summary_rows(self, X, y=None) -> np.ndarray:
        """[y, x in feature_names_ order] rows of a batch the model knows every feature of."""
        if y is None:
            raise TypeError("an OnlineRegressionMixture summarises (X, y): the target is missing")
        if isinstance(X, pd.DataFrame):
            unknown = [name for name in X.columns if name not in self._index]
            if unknown:
                raise ValueError(f"feature {unknown[0]!r} is not in the model's features {self.feature_names_}")
            features = frame_values(X, X.columns)
            columns = [1 + self._index[name] for name in X.columns]
        else:
            features = frame_values(np.asarray(X), self.feature_names_)
            columns = list(range(1, 1 + len(self.feature_names_)))
        target = _target_values(y)
        if len(target) != len(features):
            raise ValueError(f"y has {len(target)} values but X has {len(features)} rows")
        rows = np.zeros((len(features), self._width()))
        rows[:, 0] = target
        rows[:, columns] = features
        return rows

    # -- River API ----------------------------------------------------------------------------
    def learn_one(self, x: dict, y) -> None:
        """Learn from one record (buffered; the model updates every `batch_size` records)."""
        if isinstance(x, dict) and any(name not in self._index for name in x):
            with self._transaction():  # a new feature widens the model before the record is screened
                self._push_row(self._row(x, y))
            return
        self._push_row(self._row(x, y))

    def learn_many(self, X: pd.DataFrame, y: pd.Series) -> None:
        """Learn from a DataFrame (or an array with the columns of `features_`, in order) and its
        targets, vectorised; same model as a `learn_one` loop."""
        features, names = self._columns_of(X)
        checked = _target_values(y)
        if len(checked) != len(features):
            raise ValueError(f"y has {len(checked)} values but X has {len(features)} rows")
        with self._transaction():
            self._learn_features(names)
            rows = np.zeros((len(features), self._width()))
            rows[:, 0] = checked
            for column, name in enumerate(names):
                rows[:, 1 + self._index[name]] = features[:, column]
            self._push_rows(rows, X.index if isinstance(X, pd.DataFrame) else None)

    def _columns_of(self, X) -> tuple[np.ndarray, list]:
        """X's values and column names: a DataFrame's own, or an array's (the model's features, in order)."""
        if isinstance(X, pd.DataFrame):
            return frame_values(X, X.columns), list(X.columns)
        return frame_values(np.asarray(X), self.feature_names_), list(self.feature_names_)

    @property
    def features_(self) -> tuple:
        """The feature names, in the order of the model's arrays."""
        return tuple(self.feature_names_)

    def screen_many(self, X: pd.DataFrame, y) -> OutlierScreen:
        """Which rows of (X, y) the outlier guard would refuse now, and why (nothing is learned).

        As `OnlineGMM.screen_many`; a feature the model has not seen yet only meets the
        too-large rule.
        """
        features, names = self._columns_of(X)
        target = _target_values(y)
        if len(target) != len(features):
            raise ValueError(f"y has {len(target)} values but X has {len(features)} rows")
        new = [name for name in names if name not in self._index]
        rows = np.zeros((len(features), self._width() + len(new)))
        rows[:, 0] = target
        for column, name in enumerate(names):
            rows[:, self._index[name] + 1 if name in self._index else self._width() + new.index(name)] = features[
                :, column
            ]
        return self._screen_rows(rows, (*self._screen_names(), *new))

    def predict_one(self, x: dict) -> float:
        """Conditional mean E[y | x] under the mixture."""
        values = self._features_of(x)
        params = self._params()
        return float(params.weights @ (params.coef @ values + params.intercept))

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        return pd.Series(self._component_means(X) @ self._params().weights, index=X.index)

    def predict_proba_one(self, x: dict, y) -> dict[int, float]:
        """Responsibilities p(z=k | x, y): {k: p}."""
        target = check_target_value(y)
        params = self._params()
        residual = target - (params.coef @ self._features_of(x) + params.intercept)
        with np.errstate(divide="ignore"):
            weighted = np.log(params.weights) - 0.5 * (
                math.log(2 * math.pi) + np.log(params.noise_variance) + residual**2 / params.noise_variance
            )
        proba = np.exp(weighted - weighted.max())
        proba /= proba.sum()
        return dict(enumerate(proba.tolist()))

    def assign_many(self, X: pd.DataFrame, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score a batch under the current parameters, before learning it (prequential).

        Returns (responsibilities p(z=k | x, y) (n, K), log p(y | x) (n,), E[y | x] (n,)).
        """
        means = self._component_means(X)
        target = np.asarray(y, dtype=float)
        if target.shape != (len(means),) or not np.all(np.isfinite(target)):
            raise ValueError(f"y must be {len(means)} finite numbers")
        params = self._params()
        residual = target[:, None] - means
        with np.errstate(divide="ignore"):
            weighted = np.log(params.weights) - 0.5 * (
                math.log(2 * math.pi) + np.log(params.noise_variance) + residual**2 / params.noise_variance
            )
        log_likelihood, resp = responsibilities(weighted)
        return resp, log_likelihood, means @ params.weights

    def assign_and_screen_many(self, X: pd.DataFrame, y) -> tuple[np.ndarray, np.ndarray, np.ndarray, OutlierScreen]:
        """`assign_many` and `screen_many` of (X, y) (the Kafka consumer's call): (responsibilities,
        log p(y | x), E[y | x], the outlier screen)."""
        with np.errstate(over="ignore", invalid="ignore"):  # an absurd row's answer is dropped anyway
            return (*self.assign_many(X, y), self.screen_many(X, y))

    def _component_means(self, X: pd.DataFrame) -> np.ndarray:
        features, names = self._columns_of(X)
        aligned = np.zeros((len(features), len(self.feature_names_)))
        for column, name in enumerate(names):
            if name in self._index:
                aligned[:, self._index[name]] = features[:, column]
        params = self._params()
        return aligned @ params.coef.T + params.intercept

    # -- fitted parameters ------------------------------------------------------------------------
    @property
    def weights_(self) -> np.ndarray:
        return self._params().weights

    @property
    def coef_(self) -> np.ndarray:
        return self._params().coef

    @property
    def intercept_(self) -> np.ndarray:
        return self._params().intercept

    @property
    def noise_variance_(self) -> np.ndarray:
        return self._params().noise_variance

    # -- state ------------------------------------------------------------------------------------
    _stats_type = RegressionStats

    def _feature_list(self) -> list:
        return list(self.feature_names_)

    def _set_features(self, names) -> None:
        self.feature_names_ = []
        self._index = {}
        self._learn_features(names)
        self.feature_names_ = list(names)  # keep the stored order
        self._index = {name: i for i, name in enumerate(self.feature_names_)}

    def _row_width(self, d: int) -> int:
        return d + 1  # the target, then the features

    def _statistics_shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        return _statistics_shapes_for(self.n_components, d)

    @classmethod
    def from_fit(cls, document, **params) -> OnlineRegressionMixture:
        """Continue online from a `streamem fit --target ...` result (model.json as a path, JSON or dict)."""
        fit = parse_fit(document, "regression")
        model = cls(n_components=fit.n_components, **params)
        model._learn_features(fit.features)
        model._start_from_fit(fit)
        return model


def _statistics_shapes_for(K: int, d: int) -> dict[str, tuple[int, ...]]:
    p = d + 1
    return {"shift": (p,), "mass": (K,), "xx": (K, p, p), "xy": (K, p), "yy": (K,)}


def _target_values(y) -> np.ndarray:
    """The targets as floats. A numeric Series (or array) is checked in one pass (~0.01 us a value);
    the per-value check, which names the problem, runs for other dtypes or when a value is not finite."""
    series = y if isinstance(y, pd.Series) else pd.Series(y)
    if series.dtype.kind in "fiub":
        values = series.to_numpy(dtype=float)
        if np.isfinite(values).all():
            return values
    return np.array([check_target_value(value) for value in np.asarray(series, dtype=object)], dtype=float)


def _check_record(x) -> None:
    """Every value of the record is a finite number (raises naming the feature otherwise)."""
    if not isinstance(x, dict):
        raise TypeError(f"a record must be a dict of feature name -> number, got {type(x).__name__}")
    record_values(x, tuple(x))
