"""Online Gaussian mixture: stepwise EM as a River clusterer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from river import base

from streamem._online import OnlineMixture, check_distinct
from streamem._validation import (
    check_choice,
    check_positive,
    frame_values,
    record_values,
    record_values_with_missing,
)
from streamem.families.base import log_responsibilities
from streamem.families.cold_kernels import cold_answers_each, provisional_scores
from streamem.families.gaussian import (
    COVARIANCE_TYPES,
    GaussianFamily,
    GaussianParams,
    GaussianStats,
    RecordScorer,
)
from streamem.families.gaussian_kernels import closest_distance
from streamem.families.gaussian_linalg import LOG_2PI as _LOG_2PI
from streamem.gaussian_mixture import GaussianMixture
from streamem.outliers import (
    DEFAULT_THRESHOLD,
    MAHALANOBIS,
    MIN_REFERENCE,
    TOO_LARGE,
    WARM_UP,
    OutlierScreen,
    make_screen,
    reference_size,
    warm_up_reference,
)
from streamem.schedules import StepSize
from streamem.state import parse_fit

__all__ = ["OnlineGMM"]

_NO_REFERENCE = np.zeros(0)  # a cold model's plan without a warm-up reference


class OnlineGMM(OnlineMixture, base.Clusterer):
    """Gaussian mixture learned online by stepwise EM, as a River clusterer.

    The model keeps running sufficient statistics (responsibility-weighted counts,
    first and second moments about a moving shift). The first `warmup` records are
    fitted by batch EM with k-means++ starts (`streamem.GaussianMixture`); after
    that, every `batch_size` records form a mini-batch whose statistics are blended
    in with step `eta_t = (t + t0) ** -alpha` (see `streamem.schedules.StepSize`),
    and the parameters are the M-step of the blend. `learn_one` only buffers a
    record, so its cost is a copy plus a share of one vectorised update;
    `learn_many` feeds the same buffer, so both give the same model.

    Before the warm-up completes, predictions come from a provisional model: the
    first K records as means, the buffered records' variance, equal weights.

    A component whose weight falls under 1e-8 is kept, not re-seeded: its mean and
    covariance stay frozen and its mass is held at that floor, so it stays finite
    and returns if records come back to it.

    Parameters
    ----------
    n_components
        Number of components K.
    covariance_type
        ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
    batch_size
        Records per stepwise update.
    step
        A `StepSize` schedule; None means `StepSize()` (alpha=0.8, t0=2, no floor).
        Give it an `eta_min` to track a drifting stream.
    warmup
        Records buffered and fitted by batch EM before the first stepwise update.
    features
        Feature names, in order. None: the sorted keys of the first record learned.
        A record with a missing or extra feature, a NaN, an inf or a non-number
        raises a `ValueError` or `TypeError` naming the feature, and the model is
        left unchanged.
    reg_covar
        Added to every covariance's diagonal after each M-step.
    averaging
        Polyak-Ruppert averaging of the parameters, starting this many updates
        after the warm-up; None to predict with the current parameters.
    seed
        Seed of the warm-up's k-means++ starts.
    missing
        ``"error"``: a missing feature is an error. ``"marginalize"``: a feature that is
        None or NaN is integrated out exactly, in learning (conditional expectations
        in the statistics) and in predictions; `impute_one` fills it in.
    outliers
        What `learn_one` / `learn_many` do with a record the guard refuses (see
        `streamem.outliers`): ``"raise"`` an `OutlierError` naming the feature and the
        distance, leaving the model unchanged (`learn_many` learns none of the frame's rows);
        ``"skip"`` it and count it in `n_outliers`; ``"learn"`` it (no distance check). A value
        with ``|x| >= 1e150`` (its square would overflow the statistics) is never learned.
    outlier_threshold
        The squared distance beyond which a record is an outlier: squared Mahalanobis
        distance to the closest component (for a record with missing features, the
        per-feature standardised distance of its observed ones). Default 1e6, i.e. 1000
        standard deviations: P(refusing a Gaussian record) < 1e-200000 for d <= 100, and the
        10-20 sd days of real stock returns (squared distance <= 67, benchmarks/outliers.py) are
        learned. With ``"skip"``, a stream that has moved (more than half of the last
        `batch_size` records refused) makes the model warm up again from them. During the
        warm-up the distance is measured from the buffered records' median in robust standard
        deviations. None: only the too-large rule.

    Attributes
    ----------
    weights_ : (K,)
    means_ : (K, d)
    covariances_ : shape set by `covariance_type`
    n_seen : records learned so far
    n_outliers : records the outlier guard refused (raised or skipped)
    skipped_ : with outliers="skip", the (row position, OutlierError) of each record the last
        learn_one / learn_many call skipped

    Examples
    --------
    >>> import numpy as np
    >>> import streamem as se
    >>> rng = np.random.default_rng(0)
    >>> model = se.OnlineGMM(n_components=2, warmup=200, batch_size=50, seed=0)
    >>> for _ in range(5000):
    ...     centre = 0.0 if rng.random() < 0.3 else 10.0
    ...     model.learn_one({"x": centre + rng.normal(), "y": rng.normal()})
    >>> order = np.argsort(model.means_[:, 0])
    >>> np.round(model.weights_[order], 1).tolist()
    [0.3, 0.7]
    >>> model.predict_one({"x": 0.2, "y": 0.0}) == int(order[0])
    True

    References
    ----------
    [^1]: Cappé, O. and Moulines, E. (2009). On-line expectation-maximization algorithm
        for latent data models. JRSS B, 71(3), 593-613.
    [^2]: Liang, P. and Klein, D. (2009). Online EM for unsupervised models. NAACL.
    """

    def __init__(
        self,
        n_components: int = 2,
        covariance_type: str = "full",
        batch_size: int = 128,
        step: StepSize | None = None,
        warmup: int = 500,
        features: tuple | None = None,
        reg_covar: float = 1e-6,
        averaging: int | None = None,
        seed: int | None = None,
        missing: str = "error",
        outliers: str = "raise",
        outlier_threshold: float | None = DEFAULT_THRESHOLD,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.batch_size = batch_size
        self.step = step
        self.warmup = warmup
        self.features = features
        self.reg_covar = reg_covar
        self.averaging = averaging
        self.seed = seed
        self.missing = missing
        self.outliers = outliers
        self.outlier_threshold = outlier_threshold
        self._check_online_params()
        check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES)
        check_choice(missing, "missing", ("error", "marginalize"))
        check_positive(reg_covar, "reg_covar", allow_zero=True)
        self._reset()

    @classmethod
    def _unit_test_params(cls):
        yield {"n_components": 2, "warmup": 20, "batch_size": 8, "seed": 42}
        yield {"n_components": 3, "covariance_type": "diag", "warmup": 30, "batch_size": 5, "averaging": 2, "seed": 1}
        yield {"n_components": 2, "warmup": 20, "batch_size": 8, "seed": 3, "missing": "marginalize"}
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
        self._feature_names = tuple(self.features) if self.features is not None else None
        self._gaussian = GaussianFamily(self.covariance_type, self.reg_covar)
        self._rng = np.random.default_rng(self.seed)

    # -- hooks for OnlineMixture ----------------------------------------------------------
    def _family(self) -> GaussianFamily:
        return self._gaussian

    def _width(self) -> int:
        return len(self._feature_names)

    def _prepare(self, rows: np.ndarray, shift):
        return self._gaussian.prepare(rows, shift)

    def _answered_statistics(self, rows: np.ndarray, resp: np.ndarray):
        return self._gaussian.answered_stats(rows, self._engine.stats.shift, resp)

    def _screen_names(self) -> tuple:
        return self._feature_names

    def _ball(self, key):
        if not isinstance(key, GaussianParams):
            return super()._ball(key)
        centre = key.weights @ key.means
        chol = key.precisions_cholesky
        if key.covariance_type == "spherical":
            trace = key.n_features * chol**2
        else:  # tr(S^-1) = |P|_F^2 with S^-1 = P P'
            trace = np.broadcast_to(
                (chol**2).reshape(key.n_components if key.covariance_type != "tied" else 1, -1).sum(axis=1),
                (key.n_components,),
            )
        radius = np.sqrt(self.outlier_threshold / trace) - np.linalg.norm(key.means - centre, axis=1)
        return centre, float(radius.max())

    def _screened_statistics(self, rows: np.ndarray):
        engine = self._engine
        if engine.averaged is not None:  # the screen judges by the averaged parameters, the update by the current
            return None
        threshold = self.outlier_threshold if self._distance_rule else np.inf
        return self._gaussian.screened_stats(rows, engine.stats.shift, engine.params, threshold)

    def _model_distances(self, rows: np.ndarray, batch=None, log_prob=None):
        """Squared Mahalanobis distance of each row to its closest component, the rule's tag, that
        component's most deviant feature, and the log-densities `log_prob(batch)` when `batch` (the
        rows prepared for the next update) was given and they are the update's (None otherwise).
        Rows with missing features: per-feature standardised distance of the observed ones.
        `log_prob`: the rows' log-densities under `_params()`, when the caller has them already.

        On the hot path (no missing value, nothing far) this is one subtraction and one reduction
        over the (n, K) log-densities: min_k D2_k = -2 max_k (log N_k - c_k)."""
        params = self._params()
        reusable = batch is not None and not batch.has_missing and params is self._engine.params
        n, d = rows.shape
        missing = np.isnan(rows).any(axis=1) if self.missing == "marginalize" else None
        given, log_prob = log_prob is not None, log_prob
        if params.covariance_type == "full" and (missing is None or not missing.any()):
            # the hot path in one compiled pass over the log-densities; any record far: the general code
            if not given:
                if not reusable:
                    batch = self._gaussian.prepare(rows, params.weights @ params.means)
                log_prob = self._gaussian.log_prob(batch, params)
            if log_prob.flags.f_contiguous:
                constant = params.log_det_precision - 0.5 * d * _LOG_2PI
                distance, far = closest_distance(log_prob.T, constant, float(self.outlier_threshold or np.inf))
                if not far:
                    return distance, MAHALANOBIS, np.zeros(n, dtype=int), log_prob if reusable else None
            given = True
        with np.errstate(over="ignore", invalid="ignore"):
            if missing is not None and missing.any():
                complete = np.where(missing[:, None], 0.0, rows)
                squared = self._squared_distances(rows, complete, params)
                partial = rows[missing][:, None, :] - params.means
                squared[missing] = np.nansum(partial * partial / _diagonal_variances(params), axis=2)
            else:
                if not given:
                    if not reusable:
                        batch = self._gaussian.prepare(rows, params.weights @ params.means)
                    log_prob = self._gaussian.log_prob(batch, params)
                squared = log_prob - (params.log_det_precision - 0.5 * d * _LOG_2PI)
            distance = squared.min(axis=1) if missing is not None and missing.any() else -2.0 * squared.max(axis=1)
            blame = np.zeros(n, dtype=int)
            far = ~(distance <= (self.outlier_threshold or np.inf))
            if far.any():
                closest = squared.argmin(axis=1) if missing is not None and missing.any() else squared.argmax(axis=1)
                deviation = (rows[far] - params.means[closest[far]]) ** 2 / _diagonal_variances(params)[closest[far]]
                blame[far] = np.nanargmax(np.where(np.isnan(deviation), -1.0, deviation), axis=1)
        return np.maximum(distance, 0.0), MAHALANOBIS, blame, log_prob if reusable else None

    def _squared_distances(self, rows: np.ndarray, complete: np.ndarray, params) -> np.ndarray:
        """(n, K) squared Mahalanobis distances of `complete` (rows with missing values filled)."""
        log_prob = self._gaussian.log_prob(self._gaussian.prepare(complete, params.weights @ params.means), params)
        return -2.0 * (log_prob - (params.log_det_precision - 0.5 * rows.shape[1] * _LOG_2PI))

    def _warm_up_params(self, rows: np.ndarray):
        batch_model = GaussianMixture(
            self.n_components,
            covariance_type=self.covariance_type,
            reg_covar=self.reg_covar,
            n_init=2,
            tol=1e-6,
            max_iter=300,
            random_state=self._rng,
            missing=self.missing,
        )
        return batch_model.fit(rows)._params

    def _provisional_params(self, rows, n_features: int | None = None):
        K = self.n_components
        d = len(self._feature_names) if n_features is None else n_features
        if rows is None or len(rows) == 0:
            means, variance = np.zeros((K, d)), np.ones(d)
        elif not np.isnan(rows).any():  # the usual case: NumPy's plain reductions, the same sums as nanmean/nanvar's
            means = rows[np.arange(K) % len(rows)]
            variance = rows.var(axis=0) if len(rows) > 1 else np.ones(d)
            variance = np.where(variance > 0, variance, 1.0)
        else:
            centre = np.nanmean(rows, axis=0)
            centre = np.where(np.isnan(centre), 0.0, centre)
            means = rows[np.arange(K) % len(rows)]
            means = np.where(np.isnan(means), centre, means)
            variance = np.nanvar(rows, axis=0) if len(rows) > 1 else np.ones(d)
            variance = np.where(variance > 0, variance, 1.0)
        return self._diagonal_params(np.full(K, 1.0 / K), means, variance)

    def _diagonal_params(self, weights: np.ndarray, means: np.ndarray, variance: np.ndarray) -> GaussianParams:
        """Parameters whose every component has the covariance diag(variance) (the provisional model's),
        in the layout of this covariance type, without the general path's factorisation: for a diagonal
        covariance the precision Cholesky factor is diag(1 / sqrt(variance)) in closed form. A cold model
        answers with these on every call (thousands of cold keyed models: most of their answer's time)."""
        K, d = means.shape
        if not (np.isfinite(variance).all() and np.isfinite(means).all()) or self.covariance_type == "spherical":
            return self._gaussian.make_params(weights, means, self._diagonal_covariances(K, variance))
        root = 1.0 / np.sqrt(variance)
        log_det = np.log(root).sum()  # the general path's sum of log diag P, component by component
        if self.covariance_type == "diag":
            return GaussianParams(
                weights, means, np.tile(variance, (K, 1)), "diag", np.tile(root, (K, 1)), np.full(K, log_det)
            )
        diagonal = np.arange(d)
        covariance, chol = np.zeros((K, d, d)), np.zeros((K, d, d))  # np.diag and np.stack cost more than this
        covariance[:, diagonal, diagonal], chol[:, diagonal, diagonal] = variance, root
        if self.covariance_type == "tied":
            return GaussianParams(weights, means, covariance[0], "tied", chol[0], np.array([log_det]))
        return GaussianParams(weights, means, covariance, "full", chol, np.full(K, log_det))

    def _diagonal_covariances(self, K: int, variance: np.ndarray) -> np.ndarray:
        return {
            "full": lambda: np.stack([np.diag(variance)] * K),
            "tied": lambda: np.diag(variance),
            "diag": lambda: np.tile(variance, (K, 1)),
            "spherical": lambda: np.full(K, variance.mean()),
        }[self.covariance_type]()

    # -- records ----------------------------------------------------------------------------
    def _names_for(self, x) -> tuple:
        if self._feature_names is not None:
            return self._feature_names
        if not isinstance(x, dict):
            raise TypeError(f"a record must be a dict of feature name -> number, got {type(x).__name__}")
        return tuple(sorted(x, key=str))

    def _row(self, x, names) -> list:
        if self.missing == "marginalize":
            return record_values_with_missing(x, names)
        return record_values(x, names)

    def _score_record(self, x) -> np.ndarray:
        """log w_k + log p(x_o | k) for the record's observed features, shape (K,)."""
        names = self._names_for(x)
        row = self._row(x, names)
        params = self._params() if self._feature_names is not None else self._provisional_params(None, len(names))
        if any(value != value for value in row):  # NaN: marginalise the missing features
            batch = self._gaussian.prepare(np.array([row]), params.weights @ params.means)
            log_norm, log_resp = self._gaussian.e_step(batch, params)
            return log_resp[0] + log_norm[0]
        # Nothing learned yet (standard normals at the origin), or a provisional model that changes
        # with every warm-up record: a cached scorer would answer with the parameters of its first use.
        if self._feature_names is None or not self.is_warm:
            return RecordScorer(params)(row)
        if self._scorer is None:
            self._scorer = RecordScorer(params)
        return self._scorer(row)

    def impute_one(self, x: dict) -> dict:
        """The record with each missing feature (None or NaN) set to E[x_m | x_o] under the mixture."""
        from streamem.families.gaussian_missing import conditional_fill

        names = self._names_for(x)
        row = record_values_with_missing(x, names)
        params = self._params() if self._feature_names is not None else self._provisional_params(None, len(names))
        return dict(zip(names, conditional_fill(np.array([row]), params)[0].tolist(), strict=True))

    def _summary_rows(self, X, y=None) -> np.ndarray:
        if y is not None:
            raise TypeError("an OnlineGMM has no target: call summarize(X)")
        names = self._feature_names
        if names is None:
            if not isinstance(X, pd.DataFrame):
                raise ValueError("the OnlineGMM does not know its features yet: give features=... or a DataFrame")
            names = tuple(sorted(X.columns, key=str))
        return _frame_values(X, names, self.missing == "marginalize")

    @property
    def features_(self) -> tuple | None:
        """The feature names, in the order of the model's arrays (None until known)."""
        return self._feature_names

    # -- River API --------------------------------------------------------------------------
    def learn_one(self, x: dict) -> None:
        """Learn from one record (buffered; the model updates every `batch_size` records)."""
        names = self._names_for(x)
        row = self._row(x, names)
        self._feature_names = names
        self._push_row(row)

    def learn_many(self, X: pd.DataFrame) -> None:
        """Learn from a DataFrame of records, vectorised; same model as a `learn_one` loop.

        Outliers: with ``outliers="raise"`` the first one raises `OutlierError` naming its row
        and no row of X is learned; with ``"skip"`` the others are learned, and `skipped_` lists
        the skipped rows as (position in X, OutlierError). `screen_many` tells which rows would
        be refused before learning (rows after the warm-up completes, or after a reference refresh
        in it, are screened by what the model has become by then: see `skipped_`).
        """
        rows = self._summary_rows(X)
        names = self._feature_names or tuple(sorted(X.columns, key=str))
        with self._transaction():
            self._feature_names = names
            self._push_rows(rows, X.index if isinstance(X, pd.DataFrame) else None)

    def screen_many(self, X: pd.DataFrame) -> OutlierScreen:
        """Which rows of X the outlier guard would refuse now, and why (nothing is learned).

        Returns an `OutlierScreen`: `.outlier` (n,) bool, `.distance` (n,) squared distances,
        `.reason(i)` the message of row i. Rows are screened with the current parameters (or
        the warm-up reference), as the next `learn_many` screens its first mini-batch.
        """
        rows = self._summary_rows(X)
        return self._screen_of(rows, self._feature_names or tuple(sorted(X.columns, key=str)))

    def _screen_of(self, rows: np.ndarray, names) -> OutlierScreen:
        if self._feature_names is None:  # nothing learned yet: only the too-large rule applies
            return make_screen(rows, names, None, np.zeros(len(rows)), WARM_UP, np.zeros(len(rows), dtype=int))
        return self._screen_rows(rows, names)

    def predict_one(self, x: dict) -> int:
        """The most responsible component for `x`."""
        return int(self._score_record(x).argmax())

    def predict_proba_one(self, x: dict) -> dict[int, float]:
        """Responsibilities of every component for `x`: {k: p}."""
        weighted = self._score_record(x)
        proba = np.exp(weighted - weighted.max())
        proba /= proba.sum()
        return dict(enumerate(proba.tolist()))

    def score_one(self, x: dict) -> float:
        """Log-density of `x` under the mixture."""
        weighted = self._score_record(x)
        top = weighted.max()
        return float(top + math.log(np.exp(weighted - top).sum()))

    def predict_many(self, X: pd.DataFrame) -> pd.Series:
        """The most responsible component of every row, as a Series aligned with X."""
        return pd.Series(self._e_step_frame(X)[1].argmax(axis=1), index=X.index)

    def predict_proba_many(self, X: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(np.exp(self._e_step_frame(X)[1]), index=X.index)

    def score_many(self, X: pd.DataFrame) -> pd.Series:
        return pd.Series(self._e_step_frame(X)[0], index=X.index)

    def assign_many(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Score a batch under the current parameters, before learning it (prequential).

        Returns (responsibilities (n, K), log-density of each record (n,)).
        """
        log_likelihood, log_resp = self._e_step_frame(X)
        return np.exp(log_resp), log_likelihood

    def assign_and_screen_many(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, OutlierScreen]:
        """`assign_many` and `screen_many` of X from one E-step (the Kafka consumer's hot path): the
        squared Mahalanobis distances come from the log-densities the responsibilities are made of
        (before the warm-up, or with missing values, the two are computed apart)."""
        rows = self._summary_rows(X)
        names = self._feature_names or tuple(sorted(X.columns, key=str))
        if self._engine is None or not self._distance_rule or np.isnan(rows).any():
            with np.errstate(over="ignore", invalid="ignore"):  # an absurd row's answer is dropped anyway
                log_likelihood, log_resp = self._e_step_rows(rows, names)
                return np.exp(log_resp), log_likelihood, self._screen_of(rows, names)
        params = self._params()
        batch = self._gaussian.prepare(rows, params.weights @ params.means)
        with np.errstate(over="ignore", invalid="ignore"):  # an absurd row's answer is dropped anyway
            log_prob = self._gaussian.log_prob(batch, params)
            screen = self._screen_rows(rows, names, log_prob=log_prob)
            log_likelihood, log_resp = log_responsibilities(self._gaussian.weighted_log_prob(batch, params, log_prob))
        return np.exp(log_resp), log_likelihood, screen

    def assign_and_learn_many(self, X, y=None) -> tuple[np.ndarray, np.ndarray, OutlierScreen]:
        if y is not None:
            raise TypeError("an OnlineGMM has no target: call assign_and_learn_many(X)")
        fast = self._cold_assign_and_learn(X)
        return fast if fast is not None else super().assign_and_learn_many(X)

    assign_and_learn_many.__doc__ = OnlineMixture.assign_and_learn_many.__doc__

    @classmethod
    def assign_and_learn_each(cls, models, X, bounds, y=None):
        if y is not None:
            raise TypeError("an OnlineGMM has no target: call assign_and_learn_each(models, X, bounds)")
        check_distinct(models)
        shape, plans = None, {}  # one compiled call answers models of one shape: the others answer alone
        is_float_rows = type(X) is np.ndarray and X.ndim == 2 and X.dtype == np.float64 and X.flags.c_contiguous
        for i, model in enumerate(models):
            plan = model._cold_plan(X[bounds[i] : bounds[i + 1]], is_float_rows) if type(model) is cls else None
            if plan is not None:
                shape = shape or (model.n_components, model.covariance_type, plan[0].shape[1])
                if (model.n_components, model.covariance_type, plan[0].shape[1]) == shape:
                    plans[i] = plan
        if not plans:
            return super().assign_and_learn_each(models, X, bounds)
        order = list(plans)
        counts = [models[i]._count for i in order]
        answered = cls._cold_answers_each([models[i] for i in order], [plans[i] for i in order], counts, shape[2])
        responsibilities, log_likelihood, distance, blame, outlier, status = answered
        # in the models' order: the compiled call changed none of them, so an error (a value missing, say)
        # leaves those before it learned and those after it as they were
        status, screens, alone, spans = status.tolist(), [], {}, {}
        start = g = 0
        for i, model in enumerate(models):
            plan = plans.get(i)
            if plan is None or status[g] == 0:
                alone[i] = model.assign_and_learn_many(X[bounds[i] : bounds[i + 1]])
                screens.append(None)
            else:
                rows, _, _, first, threshold = plan
                n = rows.shape[0]
                spans[i] = (start, start + n)
                if status[g] == 1:  # passed: learned
                    model._take_cold_rows(rows, counts[g], first)
                    screens.append(None)
                else:  # a row refused: nothing learned
                    part = slice(start, start + n)
                    screen = OutlierScreen(distance[part], outlier[part], threshold, model._feature_names, rows,
                                           np.full(n, WARM_UP), blame[part])
                    screens.append(screen)
            if plan is not None:
                start += plan[0].shape[0]
                g += 1
        if not alone:  # every row answered by the compiled call, in the models' order
            return responsibilities, log_likelihood, None, screens
        spans = {i: slice(*span) for i, span in spans.items()}
        joined = [
            alone[i] if i in alone else (responsibilities[spans[i]], log_likelihood[spans[i]], screens[i])
            for i in range(len(models))
        ]
        return cls._joined_answers(joined)

    @staticmethod
    def _cold_answers_each(models, plans: list, counts: list[int], d: int) -> tuple:
        """(responsibilities, log-likelihoods, distances, blame, outlier, status per model) of the
        planned models' rows (`_cold_plan`), one after the other, from one compiled call."""
        buffers = [model._buffer[:count] for model, count in zip(models, counts, strict=True) if count]
        rows_of = [plan[0] for plan in plans]
        referenced = [plan[1] is not _NO_REFERENCE for plan in plans]
        zeros, ones = np.zeros(d), np.ones(d)
        centres = np.array([plan[1] if known else zeros for plan, known in zip(plans, referenced, strict=True)])
        scales = np.array([plan[2] if known else ones for plan, known in zip(plans, referenced, strict=True)])
        log_resp, log_likelihood, distance, blame, outlier, status = cold_answers_each(
            np.concatenate(buffers) if buffers else np.zeros((0, d)),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            np.concatenate(rows_of),
            np.concatenate([[0], np.cumsum([rows.shape[0] for rows in rows_of])]).astype(np.int64),
            models[0].n_components,
            models[0].covariance_type == "spherical",
            centres,
            scales,
            np.array(referenced),
            np.array([math.inf if plan[4] is None else plan[4] for plan in plans]),
            TOO_LARGE,
        )
        return np.exp(log_resp), log_likelihood, distance, blame, outlier, status

    assign_and_learn_each.__func__.__doc__ = OnlineMixture.assign_and_learn_each.__func__.__doc__

    def _cold_plan(self, X, is_float_rows: bool = False):
        """(rows, reference centre, scale, the first reference or None, threshold) when the compiled call
        takes this batch of a cold model (`_cold_assign_and_learn`), else None. `is_float_rows`: X is
        known to be a C-contiguous 2-D float array (its width is still checked)."""
        names, count = self._feature_names, self._count
        if (
            self._engine is not None
            or names is None
            or self.missing == "marginalize"
            or self._moved
            or not (is_float_rows or (type(X) is np.ndarray and X.ndim == 2 and X.dtype == np.float64))
            or X.shape[1] != len(names)
            or not 0 < X.shape[0] < self.warmup - count
        ):
            return None
        n = X.shape[0]
        if self._refused:  # refusals in the window cut learn_many's spans (`_screen_span`)
            recent = sum(1 for i, _ in self._refused if i >= self._screened - self.batch_size)
            if recent and n > max(1, self.batch_size // 2 + 1 - recent):
                return None
        rows = X if is_float_rows else np.ascontiguousarray(X)
        centre = scale = _NO_REFERENCE
        first = None  # the first reference, when these rows complete the first 20
        if self._distance_rule:
            if count >= MIN_REFERENCE:
                if count + n > 2 * reference_size(count):  # the reference refreshes within the batch
                    return None
                centre, scale = self._warm_up_reference()
            elif count + n == MIN_REFERENCE:  # of the buffered rows and these, as learn_many's one span
                buffered = self._buffer[:count] if self._buffer is not None else rows[:0]
                centre, scale = first = warm_up_reference(buffered, rows)
            elif count + n > MIN_REFERENCE:  # learn_many would screen these in two spans
                return None
        return rows, centre, scale, first, self.outlier_threshold if self._distance_rule else None

    def _take_cold_rows(self, rows: np.ndarray, count: int, first) -> None:
        """What learn_many does with a cold model's rows its screen passed (`count` were buffered
        before them; `first`: the first reference, when they complete the first 20)."""
        n = rows.shape[0]
        if not count:  # else the buffer is there, of the warm-up's size
            self._ensure_buffer(rows.shape[1])
        self._buffer[count : count + n] = rows
        self.skipped_ = ()
        self._calls += 1
        self._screened += n
        if n == 1:
            self._origins.append((self._calls, 0))
        else:
            self._origins.extend((self._calls, position) for position in range(n))
        self._count += n
        self.n_seen += n
        if first is not None:  # what `_warm_up_reference` takes from the same 20 rows, now buffered
            self._reference = (MIN_REFERENCE, first)

    def _cold_assign_and_learn(self, X):
        """`assign_and_learn_many` of a cold model's usual batch, in one compiled call: a float array
        of the model's features, no value missing or too large, every row screened by one reference
        (none before 20 records, that of the first 20, then the cached one of the first 20, 40, 80,
        ...), as `learn_many` would screen them, and no warm-up fit within the batch. Then the
        answer's screen is the learning's, so the rows it passes go straight into the buffer. None:
        the general path answers (nothing was done)."""
        plan = self._cold_plan(X)
        if plan is None:
            return None
        rows, _, _, first, threshold = plan
        count = self._count
        resp, log_likelihood, distance, blame, outlier, status = self._cold_answers_each(
            [self], [plan], [count], rows.shape[1]
        )
        if status[0] == 0:
            return None
        if status[0] == 1:
            self._take_cold_rows(rows, count, first)
        what = np.full(len(rows), WARM_UP)
        screen = OutlierScreen(distance, outlier, threshold, self._feature_names, rows, what, blame)
        return resp, log_likelihood, screen

    def _cold_scores(self, rows: np.ndarray):
        """(log-likelihoods, log-responsibilities) of rows under a cold model's provisional parameters in
        one compiled call (`cold_kernels`), or None where the general path answers: nothing learned yet,
        missing values allowed, or a variance that overflows. (One model per key answers thousands of
        small batches while cold.)"""
        if self._feature_names is None or self.missing == "marginalize":
            return None
        buffer = self._buffer if self._buffer is not None else rows[:0]
        log_likelihood, log_resp, finite = provisional_scores(
            buffer,
            self._count,
            np.ascontiguousarray(rows, dtype=float),
            self.n_components,
            self.covariance_type == "spherical",
        )
        return (log_likelihood, log_resp) if finite else None

    def _e_step_frame(self, X: pd.DataFrame):
        return self._e_step_rows(self._summary_rows(X), self._feature_names or tuple(sorted(X.columns, key=str)))

    def _e_step_rows(self, rows: np.ndarray, names):
        if self._engine is None and (scores := self._cold_scores(rows)) is not None:
            return scores
        params = self._params() if self._feature_names else self._provisional_params(None, len(names))
        return self._gaussian.e_step(self._gaussian.prepare(rows, params.weights @ params.means), params)

    # -- fitted parameters --------------------------------------------------------------------
    @property
    def weights_(self) -> np.ndarray:
        return self._current().weights

    @property
    def means_(self) -> np.ndarray:
        return self._current().means

    @property
    def covariances_(self) -> np.ndarray:
        return self._current().covariances

    def _current(self):
        if self._feature_names is None:
            raise AttributeError("the model has seen no record yet, so it has no parameters")
        return self._params()

    # -- state --------------------------------------------------------------------------------
    _stats_type = GaussianStats

    def _feature_list(self) -> list | None:
        return None if self._feature_names is None else list(self._feature_names)

    def _set_features(self, names) -> None:
        self._feature_names = tuple(names)

    def _row_width(self, d: int) -> int:
        return d

    def _statistics_shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        K = self.n_components
        second = (K, d * (d + 1) // 2) if self.covariance_type in ("full", "tied") else (K, d)
        return {"shift": (d,), "mass": (K,), "first": (K, d), "second": second}

    @classmethod
    def from_fit(cls, document, **params) -> OnlineGMM:
        """Continue online from a `streamem fit` result (model.json as a path, JSON text or dict).

        The fit's normalised statistics become the running statistics, as if its records had
        been the warm-up; `params` set the online model's other arguments (batch_size, step, ...).

        Examples
        --------
        >>> import numpy as np, streamem as se
        >>> from streamem.report import fit_document
        >>> X = np.random.default_rng(0).normal(size=(500, 2))
        >>> batch = se.GaussianMixture(1).fit(X)
        >>> online = se.OnlineGMM.from_fit(fit_document(batch, ["a", "b"], X), batch_size=50)
        >>> online.is_warm, np.allclose(online.means_, batch.means_)
        (True, True)
        """
        fit = parse_fit(document, "gaussian")
        model = cls(
            n_components=fit.n_components,
            covariance_type=fit.covariance_type,
            features=tuple(fit.features),
            missing=fit.missing or "error",
            **params,
        )
        model._feature_names = tuple(fit.features)
        model._start_from_fit(fit)
        return model


def _frame_values(X: pd.DataFrame, names: tuple, allow_missing: bool = False) -> np.ndarray:
    """The model's feature columns of X; a missing or extra column is an error, as in a record."""
    if isinstance(X, pd.DataFrame) and not allow_missing:
        # learn_many's frames: when X has exactly the model's columns, in order, and pandas gives floats
        # (every column numeric), one sum says every value is finite (NaN and inf make it non-finite);
        # 25 us against 120 for the column-by-column checks, which still run on anything else
        values = X.to_numpy()
        if values.dtype == np.float64 and X.columns.tolist() == list(names):
            values = np.ascontiguousarray(values)
            with np.errstate(over="ignore"):  # finite values near 1e308 can sum to inf: the checks below
                total = np.add.reduce(values, axis=None)
            if np.isfinite(total):
                return values
    if isinstance(X, pd.DataFrame):
        missing = [name for name in names if name not in X.columns]
        if missing:
            raise ValueError(f"feature {missing[0]!r} is missing from the DataFrame")
        extra = [name for name in X.columns if name not in set(names)]
        if extra:
            raise ValueError(f"unexpected feature {extra[0]!r}; the model's features are {list(names)}")
    return frame_values(X, names, allow_missing=allow_missing)


def _diagonal_variances(params) -> np.ndarray:
    """Each component's variances (K, d), whatever the covariance type."""
    K, d = params.means.shape
    cov = params.covariances
    if params.covariance_type == "full":
        return np.diagonal(cov, axis1=1, axis2=2)
    if params.covariance_type == "tied":
        return np.broadcast_to(np.diag(cov), (K, d))
    if params.covariance_type == "diag":
        return cov
    return np.broadcast_to(cov[:, None], (K, d))
