"""Markov-switching linear regression fitted by Baum-Welch: regression lines that switch with a hidden regime."""

from __future__ import annotations

import itertools

import numpy as np

from streamem._hmm_estimator import HiddenMarkovModel, check_magnitude
from streamem._validation import check_array, check_choice, check_positive, check_target
from streamem.engines.markov_chain import filter_states, sequence_bounds
from streamem.families.base import Summary
from streamem.families.markov import pooled_for_dead
from streamem.families.regression import RegressionBatch, RegressionFamily, RegressionParams, RegressionStats
from streamem.regression_mixture import REGRESSION_INITS, quantile_start, random_subset_start

__all__ = ["MarkovSwitchingRegression", "keep_regression_states"]


class MarkovSwitchingRegression(HiddenMarkovModel):
    """Linear regression whose coefficients switch with a hidden Markov regime, fitted by Baum-Welch (EM).

    The regime z_t behind each record follows a Markov chain (start probabilities `startprob_`,
    transition matrix `transmat_`), and in regime k, ``y_t | x_t, z_t = k ~ N(b_k . [x_t, 1], s_k^2)``
    (Hamilton 1989; statsmodels' `MarkovRegression` with every coefficient switching). The emission
    family and its M-step are those of `RegressionMixture`, each record weighted by the posterior
    probability of each regime instead of a mixture responsibility.

    Parameters
    ----------
    n_states
        Number of regimes K.
    switching_variance
        True: one noise variance per regime; False: one variance shared by all regimes (the
        M-step pools the residual sums of squares).
    max_iter
        Baum-Welch iterations per start; 0 keeps the start as the fitted parameters (to decode
        with known parameters). A `ConvergenceWarning` is raised when they run out.
    tol
        Convergence threshold on the change of the log-likelihood per record.
    n_init
        Number of starts; the one with the highest log-likelihood is kept.
    init
        How the lines start when `coef_init` / `intercept_init` are not given: ``"quantiles"``
        (the pooled least-squares line offset to K quantiles of its residuals; further starts
        under `n_init` use random subsets) or ``"random_from_data"`` (each line fitted to a random
        handful of records), as `RegressionMixture`.
    reg_noise
        Added to every noise variance after each M-step, so a regime that fits its records
        exactly stays finite.
    startprob_init, transmat_init
        Starting chain; uniform when not given.
    coef_init, intercept_init
        Starting lines, (K, d) and (K,), given together.
    noise_variance_init
        Starting noise variances, (K,) or one number (equal values when `switching_variance`
        is False). When missing but the lines are given: the variance of each record's residual
        from its nearest line.
    random_state
        Seed (int), a `numpy.random.Generator`, or None.

    Attributes
    ----------
    startprob_ : (K,)
    transmat_ : (K, K), rows sum to 1
    coef_ : (K, d)
    intercept_ : (K,)
    noise_variance_ : (K,), all equal when `switching_variance` is False
    converged_, n_iter_ : convergence of the best start
    log_likelihoods_ : the total log-likelihood of all sequences at each iteration (before its M-step)

    Notes
    -----
    The start distribution `startprob_` is a free parameter, as in hmmlearn; statsmodels and
    Stata start each series from the chain's stationary distribution instead, a constraint,
    so the maximum likelihood here is at least theirs (on the Fed funds AR(1) of their manual,
    -264.66 against -264.71). A regime that receives no records in an iteration keeps its line,
    its variance and its row of the transition matrix; nothing becomes NaN. `score` is the total
    log-likelihood log p(y | X) of all sequences.

    Examples
    --------
    >>> import numpy as np, streamem as se
    >>> rng = np.random.default_rng(0)
    >>> states = np.repeat([0, 1, 0, 1], 250)  # regimes that last 250 records
    >>> x = rng.uniform(0, 10, 1000)
    >>> y = np.where(states == 0, 0.5 * x + 1, 1.5 * x - 2) + rng.normal(0, 0.3, 1000)
    >>> msr = se.MarkovSwitchingRegression(2, random_state=0).fit(x[:, None], y)
    >>> order = np.argsort(msr.coef_[:, 0])
    >>> np.round(msr.coef_[order, 0], 1).tolist(), np.round(msr.intercept_[order], 1).tolist()
    ([0.5, 1.5], [1.0, -2.0])
    >>> int((np.diff(msr.predict(x[:, None], y)) != 0).sum())  # three switches, as in the data
    3
    """

    def __init__(
        self,
        n_states: int = 1,
        switching_variance: bool = True,
        max_iter: int = 100,
        tol: float = 1e-4,
        n_init: int = 1,
        init: str = "quantiles",
        reg_noise: float = 1e-6,
        startprob_init=None,
        transmat_init=None,
        coef_init=None,
        intercept_init=None,
        noise_variance_init=None,
        random_state=None,
    ):
        self.n_states = n_states
        self.switching_variance = switching_variance
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.init = init
        self.reg_noise = reg_noise
        self.startprob_init = startprob_init
        self.transmat_init = transmat_init
        self.coef_init = coef_init
        self.intercept_init = intercept_init
        self.noise_variance_init = noise_variance_init
        self.random_state = random_state

    # -- the family -------------------------------------------------------------------------
    def _family(self) -> RegressionFamily:
        return RegressionFamily(self.reg_noise, shared_variance=not self.switching_variance)

    def _batch(self, X, y, *, fitting: bool = False) -> tuple[RegressionBatch, int]:
        if fitting:
            check_choice(self.init, "init", REGRESSION_INITS)
            check_positive(self.reg_noise, "reg_noise")
            if not isinstance(self.switching_variance, (bool, np.bool_)):
                raise ValueError(f"switching_variance must be True or False, got {self.switching_variance!r}")
            X = check_magnitude(check_array(X), "X")
            y = check_magnitude(check_target(y, n_samples=X.shape[0]), "y")
            return self._family().prepare(X, y), X.shape[0]
        X = check_magnitude(check_array(X, n_features=self.n_features_in_), "X")
        y = check_magnitude(check_target(y, n_samples=X.shape[0]), "y")
        return self._family().prepare(X, y, self._shift), X.shape[0]

    def _remember_data(self, batch: RegressionBatch) -> None:
        self.n_features_in_ = batch.design.shape[1] - 1
        self._shift = batch.shift

    def _initial_emissions(self, family: RegressionFamily, batch: RegressionBatch, rng) -> RegressionParams:
        K, d = self.n_states, batch.design.shape[1] - 1
        first_start = next(self._starts) == 0
        coef, intercept, variance = self._given_emissions(K, d)
        if coef is None:
            if self.init == "quantiles" and first_start:
                started = quantile_start(family, batch, K)
            else:
                started = random_subset_start(family, batch, K, rng)
            coef, intercept = started.coef, started.intercept
            if variance is None:
                variance = started.noise_variance
        elif variance is None:  # the residual of each record from its nearest given line
            shift_x, shift_y = batch.shift[:d], batch.shift[d]
            lines = batch.design[:, :d] @ coef.T + (intercept + coef @ shift_x - shift_y)
            nearest = np.min((batch.target[:, None] - lines) ** 2, axis=1)
            variance = np.full(K, nearest.mean() + family.reg_noise)
        return family.make_params(np.full(K, 1.0 / K), coef, intercept, variance)

    def _given_emissions(self, K: int, d: int):
        """coef_init, intercept_init, noise_variance_init checked (None where not given)."""
        if (self.coef_init is None) != (self.intercept_init is None):
            raise ValueError("coef_init and intercept_init must be given together")
        coef = intercept = variance = None
        if self.coef_init is not None:
            coef = check_array(self.coef_init, name="coef_init", n_features=d)
            if coef.shape[0] != K:
                raise ValueError(f"coef_init must have {K} rows (one per state), got {coef.shape[0]}")
            intercept = _state_values(self.intercept_init, "intercept_init", K)
        if self.noise_variance_init is not None:
            variance = _state_values(self.noise_variance_init, "noise_variance_init", K)
            if np.any(variance <= 0):
                raise ValueError(f"noise_variance_init must be > 0, got {variance.tolist()}")
            if not self.switching_variance and np.ptp(variance) > 0:
                raise ValueError(
                    f"noise_variance_init must be one value when switching_variance=False, got {variance.tolist()}"
                )
        return coef, intercept, variance

    def _keep_states(
        self, family: RegressionFamily, emissions: RegressionStats, old: RegressionParams, dead: np.ndarray
    ) -> RegressionParams:
        return keep_regression_states(family, emissions, old, dead)

    def _set_emissions(self, emissions: RegressionParams) -> None:
        self.coef_ = emissions.coef
        self.intercept_ = emissions.intercept
        self.noise_variance_ = emissions.noise_variance

    def _n_emission_parameters(self) -> int:
        K = self.transmat_.shape[0]
        return self._family().n_parameters(K, self.n_features_in_) - (K - 1)  # no mixture weights

    # -- public methods -----------------------------------------------------------------------
    def fit(self, X, y, lengths=None) -> MarkovSwitchingRegression:
        """Fit by Baum-Welch. X (n, d) regressors, y (n,) targets; `lengths`: the lengths of the
        sequences the records hold one after the other (None: one sequence); ValueError unless
        they are positive and sum to len(X)."""
        self._starts = itertools.count()  # the first start is `init`'s, the others random subsets
        return self._fit((X, y), lengths)

    def summarize(self, X, y, lengths=None) -> Summary:
        """One E-step: `Summary(responsibilities (n, K) smoothed state probabilities, log_likelihood
        (n,) log p(y_t | x_t, records before t), statistics HMMStats)`; `apply(statistics)` is the M-step."""
        return self._summarize((X, y), lengths)

    def score(self, X, y, lengths=None) -> float:
        """Total log-likelihood of the sequences, log p(y | X)."""
        return self._score((X, y), lengths)

    def predict(self, X, y, lengths=None) -> np.ndarray:
        """The most likely regime path (Viterbi), shape (n,)."""
        return self._predict((X, y), lengths)

    def predict_proba(self, X, y, lengths=None) -> np.ndarray:
        """Smoothed regime probabilities P(z_t | the whole sequence), shape (n, K)."""
        return self._predict_proba((X, y), lengths)

    def filter_proba(self, X, y, lengths=None) -> np.ndarray:
        """Filtered regime probabilities P(z_t | records up to t), shape (n, K): what a stream knows."""
        return self._filter_proba((X, y), lengths)

    def predict_components(self, X) -> np.ndarray:
        """Each regime's line b_k . [x, 1], shape (n, K)."""
        self._check_fitted()
        X = check_array(X, n_features=self.n_features_in_)
        return X @ self.coef_.T + self.intercept_

    def predict_mean(self, X, y, lengths=None) -> np.ndarray:
        """One-step forecast of every target from the records before it, shape (n,).

        ``E[y_t | x_t, records before t] = sum_k P(z_t = k | records before t) (b_k . [x_t, 1])``,
        where P(z_t | records before t) is the filter at t - 1 moved one step through `transmat_`
        (`startprob_` at the first record of each sequence). y_t itself is not used for the
        forecast of y_t, only for those after it: this is what a stream could have predicted
        before y_t arrived (statsmodels' ``predict(probabilities="predicted")``).

        Examples
        --------
        >>> import numpy as np, streamem as se
        >>> msr = se.MarkovSwitchingRegression(
        ...     2, max_iter=0, startprob_init=[0.5, 0.5], transmat_init=[[0.9, 0.1], [0.1, 0.9]],
        ...     coef_init=[[1.0], [-1.0]], intercept_init=[0.0, 0.0], noise_variance_init=[1.0, 1.0])
        >>> X, y = np.ones((3, 1)), np.array([1.0, 1.0, 1.0])
        >>> msr.fit(X, y).predict_mean(X, y).round(3).tolist()  # the records pull it to regime 0's line
        [0.0, 0.609, 0.749]
        """
        self._check_fitted()
        batch, n = self._batch(X, y)
        starts, ends = sequence_bounds(lengths, n)
        family, params = self._family(), self._params
        chain = params.chain
        filtered = filter_states(
            family.log_prob(batch, params.emissions), chain.startprob, chain.transmat, starts, ends
        )[0]
        predicted = np.empty_like(filtered)
        predicted[1:] = filtered[:-1] @ chain.transmat
        predicted[starts] = chain.startprob  # a new sequence knows nothing of the one before
        lines = family.predict_components(batch, params.emissions) + batch.shift[-1]
        return np.einsum("tk,tk->t", predicted, lines)

    def bic(self, X, y, lengths=None) -> float:
        """Bayesian information criterion (lower is better)."""
        return self._bic((X, y), lengths)

    def aic(self, X, y, lengths=None) -> float:
        """Akaike information criterion (lower is better)."""
        return self._aic((X, y), lengths)


def _state_values(value, name: str, K: int) -> np.ndarray:
    """`value` as K finite numbers (one number stands for all K)."""
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {K} numbers, got {value!r}") from None
    if array.ndim == 0:
        array = np.full(K, float(array))
    if array.shape != (K,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be {K} finite numbers (one per state), got {value!r}")
    return array


def keep_regression_states(
    family: RegressionFamily, emissions: RegressionStats, old: RegressionParams, dead: np.ndarray
) -> RegressionParams:
    """The regression emissions' M-step when the states in `dead` got no records: they keep `old`'s
    lines (and variances, when each state has its own)."""
    switching = not family.shared_variance
    if switching:  # a dead state's M-step on all records' statistics: finite, then replaced
        emissions = pooled_for_dead(emissions, dead)
    # (a shared variance pools every state's residuals: a dead state adds nothing to them, and a
    # stand-in for its statistics would change the variance the live states share)
    new = family.m_step(emissions)
    coef = np.where(dead[:, None], old.coef, new.coef)
    intercept = np.where(dead, old.intercept, new.intercept)
    variance = np.where(dead, old.noise_variance, new.noise_variance) if switching else new.noise_variance
    return family.make_params(new.weights, coef, intercept, variance)
