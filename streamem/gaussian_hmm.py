"""Gaussian hidden Markov model fitted by Baum-Welch: regimes that persist from record to record."""

from __future__ import annotations

import numpy as np

from streamem._batch_estimator import as_generator
from streamem._hmm_estimator import HiddenMarkovModel, check_magnitude
from streamem._validation import check_array, check_choice, check_positive
from streamem.families.base import Summary
from streamem.families.gaussian import COVARIANCE_TYPES, GaussianFamily, GaussianParams
from streamem.families.markov import pooled_for_dead
from streamem.init import INIT_METHODS, initial_responsibilities

__all__ = ["GaussianHMM", "keep_gaussian_states"]


class GaussianHMM(HiddenMarkovModel):
    """Hidden Markov model with Gaussian emissions, fitted by Baum-Welch (EM).

    Records arrive in sequences; the state behind each record follows a Markov chain (start
    probabilities `startprob_`, transition matrix `transmat_`), and a record in state k is drawn
    from N(means_[k], covariances_[k]). The API follows hmmlearn's `GaussianHMM`; the emission
    family and its M-step are those of `GaussianMixture`, with each record weighted by the
    posterior probability of each state instead of a mixture responsibility.

    Parameters
    ----------
    n_states
        Number of hidden states K.
    covariance_type
        ``"full"`` (K, d, d), ``"tied"`` (d, d), ``"diag"`` (K, d) or ``"spherical"`` (K,), as in
        `GaussianMixture`.
    max_iter
        Baum-Welch iterations per start; 0 keeps the start as the fitted parameters (to decode
        with known parameters). A `ConvergenceWarning` is raised when they run out.
    tol
        Convergence threshold on the change of the log-likelihood per record.
    n_init
        Number of starts; the one with the highest log-likelihood is kept.
    init
        How the emissions start when `means_init` is not given: ``"kmeans++"``, ``"random"`` or
        ``"random_from_data"`` (as `GaussianMixture`).
    reg_covar
        Added to the diagonal of every covariance after each M-step.
    startprob_init, transmat_init
        Starting chain; uniform when not given.
    means_init, covariances_init
        Starting emissions; whichever is missing comes from `init`.
    random_state
        Seed (int), a `numpy.random.Generator`, or None.

    Attributes
    ----------
    startprob_ : (K,)
    transmat_ : (K, K), rows sum to 1
    means_ : (K, d)
    covariances_ : shape set by `covariance_type`
    converged_, n_iter_ : convergence of the best start
    log_likelihoods_ : the total log-likelihood of all sequences at each iteration (before its
        M-step), as hmmlearn's `monitor_.history`

    Notes
    -----
    A state that receives no records in an iteration keeps its emission parameters and its row
    of the transition matrix; nothing becomes NaN. `score` is the total log-likelihood of all
    sequences (hmmlearn's convention), not a mean per record as `GaussianMixture.score`.

    Examples
    --------
    >>> import numpy as np, streamem as se
    >>> rng = np.random.default_rng(0)
    >>> states = np.repeat([0, 1, 0, 1], 250)  # regimes that last 250 records
    >>> X = rng.normal(loc=np.where(states == 0, 0.0, 3.0), scale=1.0)[:, None]
    >>> hmm = se.GaussianHMM(2, random_state=0).fit(X)
    >>> [round(float(m)) for m in np.sort(hmm.means_.ravel())]
    [0, 3]
    >>> bool(np.all(np.diag(hmm.transmat_) > 0.98))
    True
    >>> path = hmm.predict(X)
    >>> int((np.diff(path) != 0).sum())  # three switches, as in the data
    3
    """

    def __init__(
        self,
        n_states: int = 1,
        covariance_type: str = "full",
        max_iter: int = 100,
        tol: float = 1e-4,
        n_init: int = 1,
        init: str = "kmeans++",
        reg_covar: float = 1e-6,
        startprob_init=None,
        transmat_init=None,
        means_init=None,
        covariances_init=None,
        random_state=None,
    ):
        self.n_states = n_states
        self.covariance_type = covariance_type
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.init = init
        self.reg_covar = reg_covar
        self.startprob_init = startprob_init
        self.transmat_init = transmat_init
        self.means_init = means_init
        self.covariances_init = covariances_init
        self.random_state = random_state

    # -- the family -------------------------------------------------------------------------
    def _family(self) -> GaussianFamily:
        return GaussianFamily(self.covariance_type, self.reg_covar)

    def _batch(self, X, *, fitting: bool = False):
        if fitting:
            check_choice(self.covariance_type, "covariance_type", COVARIANCE_TYPES)
            check_choice(self.init, "init", INIT_METHODS)
            check_positive(self.reg_covar, "reg_covar", allow_zero=True)
            X = check_magnitude(check_array(X), "X")
            return self._family().prepare(X), X.shape[0]
        X = check_magnitude(check_array(X, n_features=self.n_features_in_), "X")
        return self._family().prepare(X, self._shift), X.shape[0]

    def _remember_data(self, batch) -> None:
        self.n_features_in_ = batch.centred.shape[1]
        self._shift = batch.shift

    def _initial_emissions(self, family: GaussianFamily, batch, rng) -> GaussianParams:
        K, d = self.n_states, batch.centred.shape[1]
        means = None if self.means_init is None else check_array(self.means_init, name="means_init", n_features=d)
        if means is not None and means.shape[0] != K:
            raise ValueError(f"means_init must have {K} rows, got {means.shape[0]}")
        covariances = None
        if self.covariances_init is not None:
            covariances = np.asarray(self.covariances_init, dtype=float)
            expected = family.covariance_shape(K, d)
            if covariances.shape != expected:
                raise ValueError(
                    f"covariances_init must have shape {expected} for covariance_type="
                    f"{self.covariance_type!r}, got {covariances.shape}"
                )
        uniform = np.full(K, 1.0 / K)
        if means is not None and covariances is not None:
            return family.make_params(uniform, means, covariances)
        if means is not None:  # each record to its nearest given mean
            distances = (((batch.centred + batch.shift)[:, None, :] - means[None]) ** 2).sum(axis=2)
            resp = np.zeros((batch.n_samples, K))
            resp[np.arange(batch.n_samples), distances.argmin(axis=1)] = 1.0
        else:
            resp = initial_responsibilities(batch.centred, K, self.init, rng)
        fitted = family.m_step(family.suff_stats(batch, resp))
        return family.make_params(
            uniform,
            fitted.means if means is None else means,
            fitted.covariances if covariances is None else covariances,
        )

    def _keep_states(self, family: GaussianFamily, emissions, old: GaussianParams, dead: np.ndarray) -> GaussianParams:
        return keep_gaussian_states(family, emissions, old, dead)

    def _set_emissions(self, emissions: GaussianParams) -> None:
        self.means_ = emissions.means
        self.covariances_ = emissions.covariances

    def _n_emission_parameters(self) -> int:
        K = self.transmat_.shape[0]
        return self._family().n_parameters(K, self.n_features_in_) - (K - 1)  # no mixture weights

    # -- public methods -----------------------------------------------------------------------
    def fit(self, X, lengths=None) -> GaussianHMM:
        """Fit by Baum-Welch. `lengths`: the lengths of the sequences X holds one after the other
        (None: one sequence); ValueError unless they are positive and sum to len(X)."""
        return self._fit((X,), lengths)

    def summarize(self, X, lengths=None) -> Summary:
        """One E-step: `Summary(responsibilities (n, K) smoothed state probabilities, log_likelihood
        (n,) log p(x_t | x_1..t-1), statistics HMMStats)`; `apply(statistics)` is the M-step.

        Examples
        --------
        >>> import numpy as np, streamem as se
        >>> X = np.random.default_rng(0).normal(size=(300, 2))
        >>> hmm = se.GaussianHMM(2, random_state=0).fit(X)
        >>> summary = hmm.summarize(X)
        >>> summary.responsibilities.shape, round(summary.statistics.count)
        ((300, 2), 300)
        >>> hmm.apply(summary.statistics)  # one more Baum-Welch iteration
        """
        return self._summarize((X,), lengths)

    def score(self, X, lengths=None) -> float:
        """Total log-likelihood of the sequences, log p(X) (hmmlearn's convention)."""
        return self._score((X,), lengths)

    def predict(self, X, lengths=None) -> np.ndarray:
        """The most likely state path (Viterbi), shape (n,)."""
        return self._predict((X,), lengths)

    def predict_proba(self, X, lengths=None) -> np.ndarray:
        """Smoothed state probabilities P(z_t | the whole sequence), shape (n, K)."""
        return self._predict_proba((X,), lengths)

    def filter_proba(self, X, lengths=None) -> np.ndarray:
        """Filtered state probabilities P(z_t | records up to t), shape (n, K): what a stream knows."""
        return self._filter_proba((X,), lengths)

    def bic(self, X, lengths=None) -> float:
        """Bayesian information criterion (lower is better)."""
        return self._bic((X,), lengths)

    def aic(self, X, lengths=None) -> float:
        """Akaike information criterion (lower is better)."""
        return self._aic((X,), lengths)

    def sample(self, n_samples: int = 1, random_state=None) -> tuple[np.ndarray, np.ndarray]:
        """Draw one sequence of `n_samples` records: (X (n, d), states (n,))."""
        self._check_fitted()
        check_positive(n_samples, "n_samples", integer=True)
        rng = as_generator(random_state)
        states = self._sample_states(n_samples, rng)
        params = self._params.emissions
        d = self.n_features_in_
        X = np.empty((n_samples, d))
        for k in range(self.transmat_.shape[0]):
            rows = np.flatnonzero(states == k)
            if rows.size:
                X[rows] = rng.multivariate_normal(params.means[k], _full_covariance(params, k), size=rows.size)
        return X, states


def _full_covariance(params: GaussianParams, k: int) -> np.ndarray:
    d = params.n_features
    covariances = params.covariances
    return {
        "full": lambda: covariances[k],
        "tied": lambda: covariances,
        "diag": lambda: np.diag(covariances[k]),
        "spherical": lambda: np.eye(d) * covariances[k],
    }[params.covariance_type]()


def keep_gaussian_states(family: GaussianFamily, emissions, old: GaussianParams, dead: np.ndarray) -> GaussianParams:
    """The Gaussian emissions' M-step when the states in `dead` got no records: they keep `old`'s
    means and covariances (a tied covariance belongs to every state: the live ones set it)."""
    tied = family.covariance_type == "tied"
    new = family.m_step(emissions if tied else pooled_for_dead(emissions, dead))
    means = np.where(dead[:, None], old.means, new.means)
    covariances = new.covariances
    if not tied:
        mask = dead.reshape((-1,) + (1,) * (covariances.ndim - 1))
        covariances = np.where(mask, old.covariances, new.covariances)
    return family.make_params(new.weights, means, covariances)
