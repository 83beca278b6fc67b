"""Online Markov-switching regression: block-online EM as a River regressor, with a filter that follows
the stream and forecasts its next target."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from river import base

from streamem._online_hmm import OnlineHiddenMarkov
from streamem._validation import check_positive, check_target_value, frame_values, record_values
from streamem.engines.baum_welch import HMMParams
from streamem.exceptions import ConvergenceWarning
from streamem.families.markov import ChainParams, HMMStats
from streamem.families.regression import RegressionFamily, RegressionParams
from streamem.markov_switching import MarkovSwitchingRegression, keep_regression_states
from streamem.outliers import TOO_LARGE
from streamem.schedules import StepSize

__all__ = ["OnlineMarkovSwitchingRegression"]

# Starts of the warm-up fit. One start (the quantile start) can stop at a fixed point of EM with flat
# lines when the regimes' lines cross near the data's centre (y = x against y = 4 - x on [0, 4]:
# slopes 0.02 and 0.11, log-likelihood -771 against -129 on 500 records); random-subset starts find
# the crossing lines, and the warm-up is small enough that three cost little.
_WARM_UP_STARTS = 3


class OnlineMarkovSwitchingRegression(OnlineHiddenMarkov, base.MiniBatchRegressor):
    """Markov-switching linear regression learned online, record by record, as a River regressor.

    In regime k, ``y | x ~ N(b_k . [x, 1], s_k^2)``, and the regime follows a Markov chain (as the
    batch `MarkovSwitchingRegression`). The records of the stream are one sequence. The first
    `warmup` records are fitted by batch Baum-Welch (`MarkovSwitchingRegression`, the best of three
    starts); after that, every `batch_size` records form a block that is smoothed by forward-backward
    (continuing the filter of the block before) and blended into running statistics with the
    step-size schedule `step` (see `streamem.engines.block_online`).

    Between updates the model keeps the **filter**, P(regime | every record learned so far).
    `predict_one(x)` is the one-step forecast of y for `x` as the stream's next record,
    ``sum_k P(z = k | the stream so far) (b_k . [x, 1])`` with P(z | so far) the filter moved
    one step through `transmat_`; it changes nothing, so River's predict-then-learn loop works,
    and `learn_one(x, y)` then moves the filter on. Before the warm-up completes, the forecast
    is the mean of the targets learned so far (0.0 before any).

    Features: with `features` given, every record must hold exactly those features (a missing or
    unexpected one raises). Without it, the model follows River's linear models: the features
    are the sorted keys of the first record, a feature first seen later joins with coefficient 0
    (the records before it read 0 there), and a feature missing from a record reads 0. NaN,
    infinities and non-numbers, in a feature or the target, raise a `ValueError` / `TypeError`
    naming it, and the model is left unchanged.

    Parameters
    ----------
    n_states
        Number of regimes K.
    switching_variance
        True: one noise variance per regime; False: one shared by all.
    batch_size
        Records per block-online update.
    step
        Step-size schedule (`StepSize`); None: `StepSize()`.
    warmup
        Records fitted by batch Baum-Welch before learning online.
    features
        Feature names, which every record must hold (default: learned from the records).
    reg_noise
        Added to every noise variance after each M-step.
    seed
        Seed of the warm-up fit (its random-subset starts).

    Attributes
    ----------
    startprob_ (K,), transmat_ (K, K), coef_ (K, d) (columns in the order of `features_`),
    intercept_ (K,), noise_variance_ (K,): the parameters (None before the warm-up);
    n_seen : records learned.

    Examples
    --------
    >>> import numpy as np, streamem as se
    >>> rng = np.random.default_rng(0)
    >>> states = np.repeat(np.arange(40) % 2, 100)  # regimes of 100 records
    >>> x = rng.uniform(0, 4, 4000)
    >>> y = np.where(states == 0, x, 4.0 - x) + rng.normal(0, 0.3, 4000)
    >>> model = se.OnlineMarkovSwitchingRegression(n_states=2, seed=0)
    >>> for value, target in zip(x, y):
    ...     model.learn_one({"x": value}, target)
    >>> order = np.argsort(model.coef_[:, 0])
    >>> np.round(model.coef_[order, 0], 1).tolist(), (np.round(model.intercept_[order], 1) + 0.0).tolist()
    ([-1.0, 1.0], [4.0, 0.0])
    >>> round(model.predict_one({"x": 1.0}), 1)  # the stream ended in regime 1: y = 4 - x
    3.0
    """

    keep_states = staticmethod(keep_regression_states)

    def __init__(
        self,
        n_states: int = 2,
        switching_variance: bool = True,
        batch_size: int = 128,
        step: StepSize | None = None,
        warmup: int = 500,
        features: tuple | None = None,
        reg_noise: float = 1e-6,
        seed: int | None = None,
    ):
        self.n_states = n_states
        self.switching_variance = switching_variance
        self.batch_size = batch_size
        self.step = step
        self.warmup = warmup
        self.features = features
        self.reg_noise = reg_noise
        self.seed = seed
        self._check_common()
        if not isinstance(switching_variance, (bool, np.bool_)):
            raise ValueError(f"switching_variance must be True or False, got {switching_variance!r}")
        check_positive(reg_noise, "reg_noise")
        if features is not None and (isinstance(features, str) or not len(features)):
            raise ValueError(f"features must be a non-empty sequence of feature names, got {features!r}")
        self._reset()

    @classmethod
    def _unit_test_params(cls):
        yield {"n_states": 2, "warmup": 20, "batch_size": 8, "seed": 42}
        yield {"n_states": 3, "switching_variance": False, "warmup": 30, "batch_size": 5, "seed": 1}

    def _reset(self) -> None:
        super()._reset()
        self._family = RegressionFamily(self.reg_noise, shared_variance=not self.switching_variance)
        self._set_features(self.features)

    # -- hooks of the online base (rows are [x..., y]) ------------------------------------------
    def _prepare(self, rows: np.ndarray, shift):
        d = rows.shape[1] - 1
        return self._family.prepare(rows[:, :d], rows[:, d], shift)

    def _warm_up_fit(self, rows: np.ndarray, lengths: list[int]):
        d = rows.shape[1] - 1
        X, y = rows[:, :d], rows[:, d]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a warm-up is a start, refined online
            fit = MarkovSwitchingRegression(
                self.n_states,
                self.switching_variance,
                n_init=_WARM_UP_STARTS,
                reg_noise=self.reg_noise,
                random_state=self.seed,
            ).fit(X, y, lengths)
        uniform = np.full(self.n_states, 1.0 / self.n_states)  # a regression HMM has no mixture weights
        params = HMMParams(
            ChainParams(fit.startprob_, fit.transmat_),
            self._family.make_params(uniform, fit.coef_, fit.intercept_, fit.noise_variance_),
        )
        return params, fit.summarize(X, y, lengths).statistics, fit.filter_proba(X, y, lengths)

    def _emission_document(self, emissions: RegressionParams) -> dict:
        return {
            "coef": emissions.coef.tolist(),
            "intercept": emissions.intercept.tolist(),
            "noise_variance": emissions.noise_variance.tolist(),
        }

    def _emission_params(self, document: dict, width: int) -> RegressionParams:
        K, d = self.n_states, width - 1
        expected = {"coef": (K, d), "intercept": (K,), "noise_variance": (K,)}
        values = {}
        for name, shape in expected.items():
            value = np.asarray(document[name], dtype=float)
            if value.shape != shape or not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must be finite numbers of shape {shape}, got shape {value.shape}")
            values[name] = value
        if np.any(values["noise_variance"] <= 0):
            raise ValueError(f"noise_variance must be > 0, got {values['noise_variance'].tolist()}")
        return self._family.make_params(np.full(K, 1.0 / K), **values)

    def _feature_list(self) -> list | None:
        return None if self._names is None else list(self._names)

    def _set_features(self, names) -> None:
        self._names = None if names is None else tuple(names)
        self._index = {} if names is None else {name: i for i, name in enumerate(self._names)}

    @staticmethod
    def _row_width(d: int) -> int:
        return d + 1

    # -- features -------------------------------------------------------------------------------
    def _add_features(self, new: list) -> None:
        """New features join with coefficient 0 and read 0 in every record kept so far (warm-up rows,
        open blocks, running statistics): the forecasts and filters do not move."""
        old_d, added = len(self._index), len(new)
        self._set_features((*(self._names or ()), *new))
        for rows in self._warm.values():
            rows[:] = [row[:old_d] + [0.0] * added + row[old_d:] for row in rows]
        engine = self._engine
        if engine is None:
            return
        stats, emissions = engine.stats, engine.params.emissions
        engine.stats = HMMStats(stats.first, stats.transitions, stats.emissions.widened(old_d, added))
        coef = np.hstack([emissions.coef, np.zeros((self.n_states, added))])
        engine.params = HMMParams(
            engine.params.chain,
            self._family.make_params(emissions.weights, coef, emissions.intercept, emissions.noise_variance),
        )
        for stream in self._streams.values():
            rows = np.zeros((stream.rows.shape[0], old_d + added + 1))
            rows[:, :old_d], rows[:, -1] = stream.rows[:, :old_d], stream.rows[:, -1]
            stream.rows = rows

    def _values(self, x, *, learn: bool) -> list:
        """The record's features in the model's order, checked; with `learn`, new ones join the model
        (only once the whole record, and its target, have been checked)."""
        if self.features is not None:
            return record_values(x, self._names)
        if not isinstance(x, dict):
            raise TypeError(f"a record must be a dict of feature name -> number, got {type(x).__name__}")
        values = record_values(x, tuple(x))  # every value a finite number, or an error naming it
        if learn:
            new = sorted((name for name in x if name not in self._index), key=str)
            if new:
                _check_size(x.keys(), values)  # before the model widens: a refused record changes nothing
                self._add_features(new)
            if not self._index:
                raise ValueError("a record must hold at least one feature")
        get = x.get
        return [get(name, 0.0) for name in self._names or ()]

    def _frame_values(self, X, *, learn: bool) -> tuple[np.ndarray, list]:
        """X's values (n, len(columns)) and its columns, checked (a DataFrame, or an array whose columns
        are `features_` in order)."""
        if not isinstance(X, pd.DataFrame):
            if self._names is None:
                raise ValueError("the model does not know its features yet: give features=... or a DataFrame")
            return frame_values(np.asarray(X), self._names), list(self._names)
        columns = list(X.columns)
        if self.features is not None:
            missing = [name for name in self._names if name not in X.columns]
            if missing:
                raise ValueError(f"feature {missing[0]!r} is missing from the frame")
            unexpected = [name for name in columns if name not in self._index]
            if unexpected:
                raise ValueError(f"unexpected feature {unexpected[0]!r}; the model's features are {list(self._names)}")
        elif not learn:  # features the model has not learned carry no coefficient: not read
            columns = [name for name in columns if name in self._index]
        return frame_values(X, columns), columns

    def _aligned(self, values: np.ndarray, columns: list) -> np.ndarray:
        """(n, d + 1) rows [x in the model's order, 0] from `values` of `columns` (missing features read 0)."""
        rows = np.zeros((values.shape[0], len(self._index) + 1))
        if columns == list(self._names or ()):
            rows[:, :-1] = values
        else:
            rows[:, [self._index[name] for name in columns]] = values
        return rows

    # -- River API --------------------------------------------------------------------------------
    def learn_one(self, x: dict, y) -> None:
        """Learn from one record: the filter moves on to it (the parameters update every `batch_size`)."""
        target = check_target_value(y)
        if self.features is None and isinstance(x, dict) and any(name not in self._index for name in x):
            _check_size(["the target"], [target])  # before a new feature joins: a refused record changes nothing
        values = self._values(x, learn=True)
        values.append(target)
        self.learn_rows(np.array([values], dtype=float))

    def learn_many(self, X: pd.DataFrame, y) -> None:
        """Learn from a DataFrame (or an array with the columns of `features_`, in order) of consecutive
        records and their targets, vectorised; the same model as a `learn_one` loop over its rows."""
        values, columns = self._frame_values(X, learn=True)
        target = _target_values(y)
        if len(target) != len(values):
            raise ValueError(f"y has {len(target)} values but X has {len(values)} rows")
        _check_size(columns, np.abs(values).max(axis=0) if len(values) else [])
        _check_size(["the target"], [np.abs(target).max()] if len(target) else [])
        if self.features is None:
            new = sorted((name for name in columns if name not in self._index), key=str)
            if new:
                self._add_features(new)
            if not self._index:
                raise ValueError("the frame must hold at least one feature")
        rows = self._aligned(values, columns)
        rows[:, -1] = target
        self.learn_rows(rows)

    def forecast_and_learn(self, rows: np.ndarray, stream=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Answer and learn consecutive validated rows [x..., y] of `stream` (the Kafka consumer's entry):
        (filtered regime probabilities (n, K), log p(y | x, the stream before) (n,), forecasts (n,)), each
        row answered as `predict_proba_one`, `score_one` and `predict_one` would have answered it just
        before learning it (during the warm-up: uniform, NaN, the mean of the targets before it)."""
        return self._take(rows, stream, answer=True, forecast=True)

    def _squared_distances(self, log_b: np.ndarray, emissions) -> np.ndarray:
        # log N(y | line_k, s_k^2) = -(log(2 pi s_k^2) + r_k^2 / s_k^2) / 2
        return np.maximum(-2.0 * log_b - np.log(2 * math.pi * emissions.noise_variance), 0.0)

    def _forecasts(self, rows: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        emissions = self._engine.params.emissions
        lines = rows[:, :-1] @ emissions.coef.T + emissions.intercept  # (n, K): each regime's line
        return np.einsum("nk,nk->n", predicted, lines)

    def _cold_forecasts(self, rows: np.ndarray) -> np.ndarray:
        targets = self._warm_targets()
        running = targets.sum() + np.concatenate([[0.0], np.cumsum(rows[:-1, -1])])
        counts = targets.size + np.arange(rows.shape[0])
        return np.divide(running, counts, out=np.zeros(rows.shape[0]), where=counts > 0)

    def _warm_targets(self) -> np.ndarray:
        return np.array([row[-1] for rows in self._warm.values() for row in rows], dtype=float)

    def _predicted(self) -> np.ndarray:
        """P(regime of the next record | the stream so far): the filter moved one step (startprob_
        for a stream that has not started)."""
        chain = self._engine.params.chain
        filtered = self.stream_filter(None)
        return chain.startprob if filtered is None else filtered @ chain.transmat

    def predict_one(self, x: dict) -> float:
        """E[y | x, the stream so far] for `x` as the stream's next record (nothing is learned)."""
        values = self._values(x, learn=False)
        if self._engine is None:
            targets = self._warm_targets()
            return float(targets.mean()) if targets.size else 0.0
        emissions = self._engine.params.emissions
        return float(self._predicted() @ (emissions.coef @ np.asarray(values, dtype=float) + emissions.intercept))

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        """`predict_one` of every row of X, each as the stream's next record (nothing is learned)."""
        values, columns = self._frame_values(X, learn=False)
        if self._engine is None:
            targets = self._warm_targets()
            return pd.Series(float(targets.mean()) if targets.size else 0.0, index=X.index, dtype=float)
        emissions = self._engine.params.emissions
        lines = self._aligned(values, columns)[:, :-1] @ emissions.coef.T + emissions.intercept
        return pd.Series(lines @ self._predicted(), index=X.index)

    def _answer(self, x: dict, y) -> tuple[np.ndarray, float]:
        target = check_target_value(y)
        values = self._values(x, learn=False)
        values.append(target)
        answer = self._next(values)
        if answer is None:  # no model yet: every regime alike, y normal about the targets so far
            K, targets = self.n_states, self._warm_targets()
            mean = float(targets.mean()) if targets.size else 0.0
            variance = float(targets.var()) if targets.size > 1 and targets.var() > 0 else 1.0
            return np.full(K, 1.0 / K), -0.5 * (math.log(2 * math.pi * variance) + (target - mean) ** 2 / variance)
        return answer

    def predict_proba_one(self, x: dict, y) -> dict[int, float]:
        """P(regime k | the stream so far and (x, y)) for (x, y) as the next record: {k: p}."""
        return dict(enumerate(self._answer(x, y)[0].tolist()))

    def score_one(self, x: dict, y) -> float:
        """log p(y | x, the stream so far): the one-step predictive log-density of y."""
        return self._answer(x, y)[1]

    # -- parameters -------------------------------------------------------------------------------
    @property
    def features_(self) -> tuple | None:
        """The feature names, in the order of `coef_`'s columns (None before the first record)."""
        return self._names

    @property
    def coef_(self):
        return None if self._engine is None else self._engine.params.emissions.coef

    @property
    def intercept_(self):
        return None if self._engine is None else self._engine.params.emissions.intercept

    @property
    def noise_variance_(self):
        return None if self._engine is None else self._engine.params.emissions.noise_variance


def _target_values(y) -> np.ndarray:
    """The targets as finite floats: a numeric vector is checked in one pass; otherwise (or when a value
    is not finite) value by value, naming the first bad one and its row."""
    index = y.index if isinstance(y, pd.Series) else None
    values = np.asarray(y.to_numpy() if index is not None else y)
    if values.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {values.shape}")
    if values.dtype.kind in "fiub":
        floats = values.astype(float)
        if np.isfinite(floats).all():
            return floats
    for position, value in enumerate(values.tolist()):
        try:
            check_target_value(value)
        except (TypeError, ValueError) as error:
            row = position if index is None else index[position]
            raise type(error)(f"{error} in row {row!r}") from None
    return values.astype(float)


def _check_size(names, values) -> None:
    """ValueError naming the first value too large for the model's statistics (|x| >= 1e150)."""
    for name, value in zip(names, values, strict=True):
        if not abs(value) < TOO_LARGE:
            what = name if name == "the target" else f"feature {name!r}"
            raise ValueError(f"{what} is {value:.3g}, too large for the model's statistics (|x| >= {TOO_LARGE:.0e})")

