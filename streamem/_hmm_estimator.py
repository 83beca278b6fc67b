"""What the batch hidden Markov models share: checks, Baum-Welch with restarts, inference on sequences.

A subclass says how its records become a family batch (`_batch`), what its family is, how its
emissions start (`_initial_emissions`), how a dead state keeps its parameters (`_keep_states`) and
which fitted attributes it shows (`_set_emissions`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from streamem._batch_estimator import BatchMixture, as_generator
from streamem._validation import check_n_components, check_positive
from streamem.engines.baum_welch import HMMParams, expected_statistics, fit_with_restarts, m_step
from streamem.engines.markov_chain import filter_states, sequence_bounds, viterbi
from streamem.exceptions import ConvergenceWarning
from streamem.families.base import Summary
from streamem.families.markov import ChainParams, check_hmm_statistics, checked_chain
from streamem.outliers import TOO_LARGE

__all__ = ["HiddenMarkovModel", "check_magnitude"]


def check_magnitude(values: np.ndarray, name: str) -> np.ndarray:
    """`values` (validated finite), or ValueError naming the first one too large for the model's arithmetic
    (|x| >= 1e150: its square overflows, and one such record would turn a whole sequence's posteriors NaN)."""
    if values.size and not np.abs(values).max() < TOO_LARGE:
        position = np.argwhere(np.abs(values) >= TOO_LARGE)[0]
        where = f"row {position[0]}" + (f", column {position[1]}" if values.ndim == 2 and values.shape[1] > 1 else "")
        raise ValueError(f"{name} {where} is {values[tuple(position)]:.3g}, too large for the model's statistics "
                         f"(|x| >= {TOO_LARGE:.0e})")
    return values


class HiddenMarkovModel(BatchMixture):
    """Base of `GaussianHMM` and `MarkovSwitchingRegression` (not public)."""

    _fitted_attribute = "transmat_"

    # -- what a subclass provides -----------------------------------------------------------
    def _family(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _batch(self, *data, fitting: bool = False):  # pragma: no cover - abstract
        """(family batch, number of records) from validated data."""
        raise NotImplementedError

    def _initial_emissions(self, family, batch, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def _keep_states(self, family, emissions, old, dead: np.ndarray):  # pragma: no cover - abstract
        """The emission M-step when the states in `dead` got no records: they keep `old`'s parameters
        (`families.markov.pooled_for_dead` gives the family's M-step statistics it can always take)."""
        raise NotImplementedError

    def _set_emissions(self, emissions) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _remember_data(self, batch) -> None:  # pragma: no cover - abstract
        """Keep what inference needs from the fitted data (its width and centre)."""
        raise NotImplementedError

    def _n_emission_parameters(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- fitting ----------------------------------------------------------------------------
    def _check_hmm(self) -> int:
        n_states = check_n_components(self.n_states)
        check_positive(self.tol, "tol", allow_zero=True)
        check_positive(self.max_iter, "max_iter", integer=True, allow_zero=True)
        check_positive(self.n_init, "n_init", integer=True)
        return n_states

    def _chain_start(self, n_states: int) -> ChainParams:
        uniform = np.full(n_states, 1.0 / n_states)
        startprob = uniform if self.startprob_init is None else self.startprob_init
        transmat = np.tile(uniform, (n_states, 1)) if self.transmat_init is None else self.transmat_init
        return checked_chain(startprob, transmat, n_states)

    def _fit(self, data: tuple, lengths):
        K = self._check_hmm()
        family = self._family()
        batch, n = self._batch(*data, fitting=True)
        if n < K:
            raise ValueError(f"X has {n} records, fewer than n_states={K}")
        starts, ends = sequence_bounds(lengths, n)
        chain = self._chain_start(K)
        layout = family.suff_stats(batch[:1], np.full((1, K), 1.0 / K))  # what `apply` will accept

        def initial_params(rng: np.random.Generator) -> HMMParams:
            return HMMParams(chain, self._initial_emissions(family, batch, rng))

        rng = as_generator(self.random_state)
        if self.max_iter == 0:  # decode with the given start
            params, stats, history, converged = initial_params(rng), None, [], False
        else:
            result = fit_with_restarts(
                family,
                batch,
                initial_params,
                starts,
                ends,
                n_init=self.n_init,
                tol=self.tol,
                max_iter=self.max_iter,
                keep_states=self._keep_states,
                rng=rng,
            )
            params, stats, history, converged = result.params, result.stats, result.log_likelihoods, result.converged
            if not converged:
                warnings.warn(
                    f"Baum-Welch did not converge within max_iter={self.max_iter} iterations (last change of "
                    f"the log-likelihood per record above tol={self.tol}); raise max_iter or tol",
                    ConvergenceWarning,
                    stacklevel=3,
                )
        self._remember_data(batch)  # only now: a fit that fails leaves a fitted model as it was
        self._emission_layout = (type(layout), layout.shapes)
        self._stats = stats
        self.converged_ = converged
        self.n_iter_ = len(history)
        self.log_likelihoods_ = list(history)
        self._set_params(params)
        return self

    def _set_params(self, params: HMMParams) -> None:
        self._params = params
        self.startprob_ = params.chain.startprob
        self.transmat_ = params.chain.transmat
        self._set_emissions(params.emissions)

    # -- statistics -------------------------------------------------------------------------
    def _summarize(self, data: tuple, lengths) -> Summary:
        self._check_fitted()
        batch, n = self._batch(*data)
        starts, ends = sequence_bounds(lengths, n)
        result, stats = expected_statistics(self._family(), batch, self._params, starts, ends)
        return Summary(result.posterior, result.log_likelihood, stats)

    def apply(self, statistics) -> None:
        """Set the parameters to the M-step of `statistics` (`HMMStats`, as `summarize` returns them):
        one Baum-Welch iteration is `model.apply(model.summarize(X).statistics)`; statistics of
        several sequences, added, give the M-step of all of them. A wrong type or shape raises
        ValueError."""
        self._check_fitted()
        K = self.transmat_.shape[0]
        kind, expected = self._emission_layout
        check_hmm_statistics(statistics, type(self).__name__, kind, {"first": (K,), "transitions": (K, K),
                                                                     "emissions": expected})
        self._set_params(m_step(self._family(), statistics, self._params, self._keep_states))
        self._stats = statistics

    # -- inference --------------------------------------------------------------------------
    def _log_b(self, data: tuple, lengths):
        self._check_fitted()
        batch, n = self._batch(*data)
        starts, ends = sequence_bounds(lengths, n)
        return self._family().log_prob(batch, self._params.emissions), starts, ends

    def _score(self, data: tuple, lengths) -> float:
        log_b, starts, ends = self._log_b(data, lengths)
        chain = self._params.chain
        return float(filter_states(log_b, chain.startprob, chain.transmat, starts, ends)[1].sum())

    def _filter_proba(self, data: tuple, lengths) -> np.ndarray:
        log_b, starts, ends = self._log_b(data, lengths)
        chain = self._params.chain
        return filter_states(log_b, chain.startprob, chain.transmat, starts, ends)[0]

    def _predict_proba(self, data: tuple, lengths) -> np.ndarray:
        return self._summarize(data, lengths).responsibilities

    def _predict(self, data: tuple, lengths) -> np.ndarray:
        log_b, starts, ends = self._log_b(data, lengths)
        chain = self._params.chain
        return viterbi(log_b, chain.startprob, chain.transmat, starts, ends)[0]

    def _n_parameters(self) -> int:
        K = self.transmat_.shape[0]
        return self._n_emission_parameters() + (K - 1) + K * (K - 1)

    def _information(self, data: tuple, lengths, penalty: float) -> float:
        return -2.0 * self._score(data, lengths) + penalty * self._n_parameters()

    def _bic(self, data: tuple, lengths) -> float:
        return self._information(data, lengths, math.log(len(np.asarray(data[0]))))

    def _aic(self, data: tuple, lengths) -> float:
        return self._information(data, lengths, 2.0)

    def _sample_states(self, n_samples: int, rng: np.random.Generator) -> np.ndarray:
        """A state path of `n_samples` steps of the fitted chain."""
        start = np.cumsum(self.startprob_)
        rows = np.cumsum(self.transmat_, axis=1)
        uniforms = rng.random(n_samples)
        states = np.empty(n_samples, dtype=np.int64)
        last = len(start) - 1
        state = min(int(np.searchsorted(start, uniforms[0] * start[-1], side="right")), last)
        states[0] = state
        for t in range(1, n_samples):  # a Markov chain is sequential; 1 us a step
            row = rows[state]
            state = min(int(np.searchsorted(row, uniforms[t] * row[-1], side="right")), last)
            states[t] = state
        return states
