"""Mixture of linear regressions fitted by batch EM."""

from __future__ import annotations

import numpy as np

from streamem._batch_estimator import BatchMixture
from streamem._validation import check_array, check_choice, check_positive, check_target
from streamem.families.base import Summary
from streamem.families.regression import RegressionFamily, RegressionParams

__all__ = ["RegressionMixture", "quantile_start", "random_subset_start"]

REGRESSION_INITS = ("quantiles", "random_from_data")


class RegressionMixture(BatchMixture):
    """Mixture of K linear regressions, `y | z=k ~ N(b_k . [x, 1], s_k^2)`, fitted by EM.

    Each M-step solves one weighted least-squares problem per component from the
    statistics `sum r x~ x~^T`, `sum r x~ y`, `sum r y^2` (x~ = [x, 1]).

    Parameters
    ----------
    n_components
        Number of regression lines K.
    tol, max_iter, n_init, random_state
        As in `GaussianMixture`.
    init
        ``"quantiles"``: the ordinary least-squares fit shifted to K quantiles of its
        residuals (deterministic; extra starts under `n_init` use random subsets);
        ``"random_from_data"``: each line fitted to a random handful of records.
    reg_noise
        Added to every noise variance, so a line that fits its points exactly stays finite.

    Attributes
    ----------
    weights_ : (K,)
    coef_ : (K, d)
    intercept_ : (K,)
    noise_variance_ : (K,)
    converged_, n_iter_, log_likelihoods_, lower_bound_ : as in `GaussianMixture`

    Examples
    --------
    >>> import numpy as np, streamem as se
    >>> rng = np.random.default_rng(0)
    >>> x = rng.uniform(0, 10, 2000)
    >>> first = rng.random(2000) < 0.5
    >>> y = np.where(first, 0.5 * x + 1, 1.5 * x + 2) + rng.normal(0, np.where(first, 0.1, 0.2))
    >>> rm = se.RegressionMixture(2, random_state=0).fit(x[:, None], y)
    >>> order = np.argsort(rm.coef_[:, 0])
    >>> np.round(rm.coef_[order, 0], 1).tolist(), np.round(rm.intercept_[order], 1).tolist()
    ([0.5, 1.5], [1.0, 2.0])
    """

    _family_fields = ("weights", "coef", "intercept", "noise_variance")

    def __init__(
        self,
        n_components: int = 1,
        tol: float = 1e-6,
        max_iter: int = 500,
        n_init: int = 1,
        init: str = "quantiles",
        reg_noise: float = 1e-6,
        random_state=None,
    ):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init = init
        self.reg_noise = reg_noise
        self.random_state = random_state

    def fit(self, X, y) -> RegressionMixture:
        K = self._check_common()
        check_choice(self.init, "init", REGRESSION_INITS)
        check_positive(self.reg_noise, "reg_noise")
        X = check_array(X)
        y = check_target(y, n_samples=X.shape[0])
        n, d = X.shape
        if n < K:
            raise ValueError(f"X has {n} samples, fewer than n_components={K}")
        family = RegressionFamily(self.reg_noise)
        batch = family.prepare(X, y)
        starts = {"count": 0}

        def initial_params(rng: np.random.Generator) -> RegressionParams:
            first = starts["count"] == 0
            starts["count"] += 1
            if self.init == "quantiles" and first:
                return quantile_start(family, batch, K)
            return random_subset_start(family, batch, K, rng)

        result = self._run(family, batch, initial_params, d)
        self._set_params(result.params)
        return self

    def _set_params(self, params: RegressionParams) -> None:
        self._params = params
        self.weights_ = params.weights
        self.coef_ = params.coef
        self.intercept_ = params.intercept
        self.noise_variance_ = params.noise_variance

    # -- statistics ---------------------------------------------------------------------
    def _family(self) -> RegressionFamily:
        return RegressionFamily(self.reg_noise)

    def summarize(self, X, y) -> Summary:
        """One E-step of (X, y) under the fitted parameters: `Summary(responsibilities (n, K),
        log p(y | x) (n,), statistics)`, the statistics summed over the records; `apply` them
        for one EM iteration."""
        log_likelihood, resp, stats = self._family().expected_stats(self._batch(X, y), self._params)
        return Summary(resp, log_likelihood, stats)

    # -- inference ----------------------------------------------------------------------
    def _batch(self, X, y=None):
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_)
        y = np.zeros(X.shape[0]) if y is None else check_target(y, n_samples=X.shape[0])
        return RegressionFamily(self.reg_noise).prepare(X, y, shift=np.zeros(X.shape[1] + 1))

    def predict(self, X) -> np.ndarray:
        """Conditional mean E[y | x] = sum_k w_k (b_k . [x, 1]), shape (n,)."""
        X = check_array(X, n_features=getattr(self, "n_features_in_", None))
        self._check_fitted()
        return (X @ self.coef_.T + self.intercept_) @ self.weights_

    def predict_components(self, X) -> np.ndarray:
        """Each line's prediction b_k . [x, 1], shape (n, K)."""
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_)
        return X @ self.coef_.T + self.intercept_

    def predict_proba(self, X, y) -> np.ndarray:
        """Responsibilities p(z=k | x, y), shape (n, K)."""
        return np.exp(RegressionFamily(self.reg_noise).e_step(self._batch(X, y), self._params)[1])

    def score_samples(self, X, y) -> np.ndarray:
        """log p(y | x) under the mixture, shape (n,)."""
        return RegressionFamily(self.reg_noise).e_step(self._batch(X, y), self._params)[0]

    def score(self, X, y) -> float:
        return float(self.score_samples(X, y).mean())

    def _n_parameters(self) -> int:
        return RegressionFamily().n_parameters(self.n_components, self.n_features_in_)

    def bic(self, X, y) -> float:
        n = check_array(X).shape[0]
        return -2.0 * self.score(X, y) * n + self._n_parameters() * np.log(n)

    def aic(self, X, y) -> float:
        n = check_array(X).shape[0]
        return -2.0 * self.score(X, y) * n + 2.0 * self._n_parameters()


def _least_squares(batch, rows=None) -> np.ndarray:
    design = batch.design if rows is None else batch.design[rows]
    target = batch.target if rows is None else batch.target[rows]
    return np.linalg.lstsq(design, target, rcond=None)[0]


def quantile_start(family: RegressionFamily, batch, K: int) -> RegressionParams:
    """The pooled least-squares line, offset to K quantiles of its residuals."""
    beta = _least_squares(batch)
    residuals = batch.target - batch.design @ beta
    offsets = np.quantile(residuals, (np.arange(K) + 0.5) / K)
    spread = residuals.var() / K**2 + family.reg_noise
    return _params_from_centred(
        family, batch, np.tile(beta, (K, 1)) + np.c_[np.zeros((K, beta.size - 1)), offsets], spread
    )


def random_subset_start(family: RegressionFamily, batch, K: int, rng: np.random.Generator) -> RegressionParams:
    """Each line fitted by least squares to d + 2 random records."""
    n, p = batch.design.shape
    size = min(n, p + 1)
    betas = np.stack([_least_squares(batch, rng.choice(n, size=size, replace=False)) for _ in range(K)])
    pooled = _least_squares(batch)
    spread = np.var(batch.target - batch.design @ pooled) + family.reg_noise
    return _params_from_centred(family, batch, betas, spread)


def _params_from_centred(family: RegressionFamily, batch, betas: np.ndarray, variance: float) -> RegressionParams:
    d = betas.shape[1] - 1
    coef = betas[:, :d]
    intercept = betas[:, d] + batch.shift[d] - coef @ batch.shift[:d]
    K = betas.shape[0]
    return family.make_params(np.full(K, 1.0 / K), coef, intercept, np.full(K, variance))
