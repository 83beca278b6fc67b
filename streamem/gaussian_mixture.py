"""Gaussian mixture fitted by batch EM: the reference the online model is checked against."""

from __future__ import annotations

import numpy as np

from streamem._batch_estimator import BatchMixture, as_generator
from streamem._validation import check_array, check_choice, check_positive
from streamem.families.base import Summary
from streamem.families.gaussian import COVARIANCE_TYPES, GaussianFamily, GaussianParams
from streamem.init import INIT_METHODS, initial_responsibilities

__all__ = ["GaussianMixture"]

_SQUARES_CACHE_LIMIT = 32 * 1024 * 1024  # floats: 256 MB


class GaussianMixture(BatchMixture):
    """Gaussian mixture model fitted by expectation-maximisation.

    The API follows scikit-learn's `GaussianMixture`. Each EM iteration is one pass
    over the data: responsibilities from one matrix product against all
    components' precision Cholesky factors, statistics from two more. The same
    family code drives the online model (`OnlineGMM`), so this estimator is a real
    reference for it.

    Parameters
    ----------
    n_components
        Number of mixture components K.
    covariance_type
        ``"full"`` (K, d, d), ``"tied"`` (d, d), ``"diag"`` (K, d) or ``"spherical"`` (K,).
    tol
        Convergence threshold on the change of the mean per-sample log-likelihood.
    max_iter
        EM iterations per start; a `ConvergenceWarning` is raised when they run out.
    n_init
        Number of starts; the one with the highest log-likelihood is kept.
    init
        ``"kmeans++"`` (k-means++ seeding and Lloyd steps), ``"random"``
        (random responsibilities) or ``"random_from_data"`` (K records as means).
    reg_covar
        Added to the diagonal of every covariance, keeping them positive definite.
    weights_init, means_init, covariances_init
        Starting parameters; any that are missing come from `init`.
    missing
        ``"error"``: a NaN is an error. ``"marginalize"``: NaN marks a missing feature,
        integrated out exactly in every E-step (Ghahramani & Jordan 1994); `impute`
        then fills missing values with their conditional expectation.
    random_state
        Seed (int), a `numpy.random.Generator`, or None.

    Attributes
    ----------
    weights_ : (K,)
    means_ : (K, d)
    covariances_ : shape set by `covariance_type`
    precisions_cholesky_ : same shape as `covariances_`
    converged_, n_iter_ : convergence of the best start
    log_likelihoods_ : mean per-sample log-likelihood at each iteration of the best start
    lower_bound_ : its last value

    Examples
    --------
    >>> import numpy as np, streamem as se
    >>> X = np.array([1.0, 1.5, 2.0, 8.0, 8.5, 9.0])[:, None]
    >>> gm = se.GaussianMixture(2, means_init=[[2.0], [7.0]], tol=1e-10).fit(X)
    >>> np.round(gm.means_.ravel(), 4).tolist(), np.round(gm.covariances_.ravel(), 4).tolist()
    ([1.5, 8.5], [0.1667, 0.1667])
    >>> gm.predict([[1.2], [8.8]]).tolist()
    [0, 1]
    """

    _family_fields = ("weights", "means", "covariances")

    def __init__(
        self,
        n_components: int = 1,
        covariance_type: str = "full",
        tol: float = 1e-6,
        max_iter: int = 500,
        n_init: int = 1,
        init: str = "kmeans++",
        reg_covar: float = 1e-6,
        weights_init=None,
        means_init=None,
        covariances_init=None,
        random_state=None,
        missing: str = "error",
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init = init
        self.reg_covar = reg_covar
        self.weights_init = weights_init
        self.means_init = means_init
        self.covariances_init = covariances_init
        self.random_state = random_state
        self.missing = missing

    # -- fitting ------------------------------------------------------------------------
    def fit(self, X, y=None) -> GaussianMixture:
        """Fit by EM; `y` is ignored (scikit-learn convention)."""
        K = self._check_common()
        check_choice(self.covariance_type, "covariance_type", COVARIANCE_TYPES)
        check_choice(self.init, "init", INIT_METHODS)
        check_positive(self.reg_covar, "reg_covar", allow_zero=True)
        check_choice(self.missing, "missing", ("error", "marginalize"))
        X = check_array(X, allow_missing=self.missing == "marginalize")
        n, d = X.shape
        if n < K:
            raise ValueError(f"X has {n} samples, fewer than n_components={K}")
        family = GaussianFamily(self.covariance_type, self.reg_covar)
        # Cache the squared terms once per fit when they fit in memory (~n d^2 / 2 floats).
        cache = n * d * (d + 1) // 2 <= _SQUARES_CACHE_LIMIT
        batch = family.prepare(X, cache_squares=cache)
        start = self._checked_start(family, K, d)

        def initial_params(rng: np.random.Generator) -> GaussianParams:
            if start["means"] is not None and start["weights"] is not None and start["covariances"] is not None:
                return family.make_params(start["weights"], start["means"], start["covariances"])
            if start["means"] is not None:  # responsibilities by nearest given mean
                distances = np.nansum((X[:, None, :] - start["means"][None]) ** 2, axis=2)
                resp = np.zeros((n, K))
                resp[np.arange(n), distances.argmin(axis=1)] = 1.0
            else:
                # k-means++ needs complete rows: missing values start at their feature's mean
                seeds = np.where(np.isnan(batch.centred), 0.0, batch.centred)
                resp = initial_responsibilities(seeds, K, self.init, rng)
            complete = family.prepare(np.where(np.isnan(X), batch.shift, X), batch.shift)
            fitted = family.m_step(family.suff_stats(complete, resp))
            return family.make_params(
                fitted.weights if start["weights"] is None else start["weights"],
                fitted.means if start["means"] is None else start["means"],
                fitted.covariances if start["covariances"] is None else start["covariances"],
            )

        result = self._run(family, batch, initial_params, d)
        self._set_params(result.params)
        return self

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X).predict(X)

    def _checked_start(self, family: GaussianFamily, K: int, d: int) -> dict:
        start = {"weights": None, "means": None, "covariances": None}
        if self.weights_init is not None:
            weights = np.asarray(self.weights_init, dtype=float)
            if weights.shape != (K,) or np.any(weights <= 0) or not np.isclose(weights.sum(), 1.0):
                raise ValueError(f"weights_init must be {K} positive values summing to 1, got {weights}")
            start["weights"] = weights
        if self.means_init is not None:
            start["means"] = check_array(self.means_init, name="means_init", n_features=d)
            if start["means"].shape[0] != K:
                raise ValueError(f"means_init must have {K} rows, got {start['means'].shape[0]}")
        if self.covariances_init is not None:
            covariances = np.asarray(self.covariances_init, dtype=float)
            expected = family.covariance_shape(K, d)
            if covariances.shape != expected:
                raise ValueError(
                    f"covariances_init must have shape {expected} for covariance_type="
                    f"{self.covariance_type!r}, got {covariances.shape}"
                )
            family.make_params(np.full(K, 1.0 / K), np.zeros((K, d)), covariances)  # checks PD
            start["covariances"] = covariances
        return start

    def _set_params(self, params: GaussianParams) -> None:
        self._params = params
        self.weights_ = params.weights
        self.means_ = params.means
        self.covariances_ = params.covariances
        self.precisions_cholesky_ = params.precisions_cholesky
        self.precisions_ = params.precisions

    # -- statistics ---------------------------------------------------------------------
    def _family(self) -> GaussianFamily:
        return GaussianFamily(self.covariance_type, self.reg_covar)

    def summarize(self, X, y=None) -> Summary:
        """One E-step of X under the fitted parameters: `Summary(responsibilities (n, K),
        log_likelihood (n,), statistics)`, the statistics summed over X's records (`y` is ignored).

        Examples
        --------
        >>> import numpy as np, streamem as se
        >>> X = np.random.default_rng(0).normal(size=(200, 2))
        >>> gm = se.GaussianMixture(2, random_state=0).fit(X)
        >>> summary = gm.summarize(X)
        >>> summary.responsibilities.shape, round(summary.statistics.count)
        ((200, 2), 200)
        >>> gm.apply(summary.statistics)  # one more EM iteration
        """
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_, allow_missing=self.missing == "marginalize")
        family = self._family()
        batch = family.prepare(X, shift=self._reference_point())
        log_likelihood, resp, stats = family.expected_stats(batch, self._params)
        return Summary(resp, log_likelihood, stats)

    # -- inference ----------------------------------------------------------------------
    def _e_step(self, X):
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_, allow_missing=self.missing == "marginalize")
        family = GaussianFamily(self.covariance_type, self.reg_covar)
        return family.e_step(family.prepare(X, shift=self._reference_point()), self._params)

    def _reference_point(self) -> np.ndarray:
        # Centring new data on the mixture mean keeps X @ P - mu @ P free of cancellation.
        return self.weights_ @ self.means_

    def score_samples(self, X) -> np.ndarray:
        """Log-density of each record under the mixture, shape (n,)."""
        return self._e_step(X)[0]

    def score(self, X, y=None) -> float:
        """Mean per-sample log-likelihood."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities, shape (n, K)."""
        return np.exp(self._e_step(X)[1])

    def predict(self, X) -> np.ndarray:
        """Most responsible component of each record, shape (n,)."""
        return self._e_step(X)[1].argmax(axis=1)

    def impute(self, X) -> np.ndarray:
        """X with every missing value (NaN) replaced by its conditional expectation given the
        observed values of its record, E[x_m | x_o] = sum_k p(k | x_o) E[x_m | x_o, k]."""
        from streamem.families.gaussian_missing import conditional_fill

        self._check_fitted()
        return conditional_fill(check_array(X, n_features=self.n_features_in_, allow_missing=True), self._params)

    def _n_parameters(self) -> int:
        return GaussianFamily(self.covariance_type).n_parameters(self.n_components, self.n_features_in_)

    def bic(self, X) -> float:
        """Bayesian information criterion (lower is better), as scikit-learn computes it."""
        n = len(np.asarray(X))
        return -2.0 * self.score(X) * n + self._n_parameters() * np.log(n)

    def aic(self, X) -> float:
        """Akaike information criterion (lower is better)."""
        n = len(np.asarray(X))
        return -2.0 * self.score(X) * n + 2.0 * self._n_parameters()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw `n_samples` records: (X (n, d), component labels (n,))."""
        self._check_fitted()
        check_positive(n_samples, "n_samples", integer=True)
        family = GaussianFamily(self.covariance_type, self.reg_covar)
        return family.sample(self._params, n_samples, as_generator(self.random_state))
