"""Baum-Welch: EM for a hidden Markov model whose emissions are one of the model families.

The E-step is forward-backward on the family's per-state log-densities; its statistics are the
chain's counts and the family's own statistics weighted by the posterior state probabilities
(`HMMStats`); the M-step is the chain's closed form and the family's M-step. Nothing here knows
which family it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np

from streamem.engines.batch import single_threaded_blas
from streamem.engines.markov_chain import ForwardBackward, forward_backward
from streamem.families.markov import DEAD_STATE_MASS, ChainParams, HMMStats, chain_m_step

__all__ = ["HMMParams", "BaumWelchResult", "expected_statistics", "m_step", "run_baum_welch", "fit_with_restarts"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HMMParams:
    """The chain's parameters and the emission family's (whose mixture weights are not used)."""

    chain: ChainParams
    emissions: object


@dataclasses.dataclass
class BaumWelchResult:
    params: HMMParams
    log_likelihoods: list[float]  # total log-likelihood of all sequences before each M-step
    converged: bool
    n_iter: int
    stats: HMMStats | None


def expected_statistics(family, batch, params: HMMParams, starts, ends) -> tuple[ForwardBackward, HMMStats]:
    """One E-step: forward-backward over the sequences and the statistics it implies."""
    log_b = family.log_prob(batch, params.emissions)
    chain = params.chain
    result = forward_backward(log_b, chain.startprob, chain.transmat, starts, ends)
    emissions = family.suff_stats(batch, result.posterior)
    return result, HMMStats(result.first, result.transitions, emissions)


def m_step(family, stats: HMMStats, previous: HMMParams, keep_states: Callable) -> HMMParams:
    """Parameters from statistics. A state the statistics never visit (expected records below
    `DEAD_STATE_MASS`) keeps its previous emission parameters: `keep_states(family, emissions, old,
    mask)` runs the M-step for that case, so a dead state stays finite and where it was instead of
    collapsing onto the data's mean with a zero covariance."""
    chain = chain_m_step(stats, previous.chain)
    dead = stats.emissions.mass < DEAD_STATE_MASS
    if dead.any():
        emissions = keep_states(family, stats.emissions, previous.emissions, dead)
    else:
        emissions = family.m_step(stats.emissions)
    return HMMParams(chain, emissions)


def run_baum_welch(
    family, batch, params: HMMParams, starts, ends, *, tol: float, max_iter: int, keep_states: Callable
) -> BaumWelchResult:
    """Iterate from `params` until the log-likelihood per record changes by less than `tol`."""
    n_records = int(ends[-1])
    log_likelihoods: list[float] = []
    previous = -math.inf
    converged = False
    stats = None
    for iteration in range(1, max_iter + 1):
        with single_threaded_blas():
            result, stats = expected_statistics(family, batch, params, starts, ends)
        total = float(np.add.reduce(result.log_likelihood))
        log_likelihoods.append(total)
        params = m_step(family, stats, params, keep_states)
        logger.debug("Baum-Welch iteration %d: log-likelihood %.8f", iteration, total)
        if abs(total - previous) / n_records < tol:
            converged = True
            break
        previous = total
    return BaumWelchResult(params, log_likelihoods, converged, len(log_likelihoods), stats)


def fit_with_restarts(
    family,
    batch,
    initial_params: Callable[[np.random.Generator], HMMParams],
    starts,
    ends,
    *,
    n_init: int,
    tol: float,
    max_iter: int,
    keep_states: Callable,
    rng: np.random.Generator,
) -> BaumWelchResult:
    """Run Baum-Welch from `n_init` starts; keep the one with the highest final log-likelihood."""
    best: BaumWelchResult | None = None
    for restart in range(n_init):
        result = run_baum_welch(
            family, batch, initial_params(rng), starts, ends, tol=tol, max_iter=max_iter, keep_states=keep_states
        )
        if result.log_likelihoods:
            logger.info(
                "Baum-Welch start %d/%d: %d iterations, log-likelihood %.6f%s",
                restart + 1,
                n_init,
                result.n_iter,
                result.log_likelihoods[-1],
                "" if result.converged else " (not converged)",
            )
        final = result.log_likelihoods[-1] if result.log_likelihoods else -math.inf
        if best is None or final > (best.log_likelihoods[-1] if best.log_likelihoods else -math.inf):
            best = result
    assert best is not None  # n_init >= 1 is checked by the estimator
    return best
