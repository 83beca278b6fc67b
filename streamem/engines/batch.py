"""Batch EM: e-step over all data, statistics of all data, m-step; repeat to convergence.

The loop is written once for every family; the families own the math.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np
from threadpoolctl import ThreadpoolController

from streamem.families.base import responsibilities

__all__ = ["EMResult", "accumulate", "fit_with_restarts", "run_em", "single_threaded_blas"]

logger = logging.getLogger(__name__)

# EM's matrix products are thin (K x n times n x d): BLAS threads give them little,
# and OpenBLAS's idle workers spin after each threaded call, taking the cores from
# the main thread. Measured on 2 shared cores (n=100k, d=10, K=8, full): 35 ms per
# iteration single-threaded, 40-170 ms (erratic) with 2 threads. So EM holds BLAS to
# one thread while it runs; the caller's setting is restored afterwards.
_BLAS = ThreadpoolController()


def single_threaded_blas():
    """Context manager: BLAS limited to one thread inside, as it was outside."""
    return _BLAS.limit(limits=1, user_api="blas")


# Rows per chunk: one chunk's (rows, K * d) temporaries stay within ~1 MB (in cache),
# and at most 1024 rows, because larger matrix products cross OpenBLAS's threading
# threshold, and on 2 shared cores its threads made an EM iteration 2-5x slower and
# erratic (measured: 37 ms at 1024 rows, 80-190 ms at 2621, n=100k, d=10, K=8).
_CHUNK_ELEMENTS = 1 << 17
_MAX_CHUNK_ROWS = 1024
_MAX_DESIGN_CHUNK_ROWS = 4096


@dataclasses.dataclass
class EMResult:
    params: object
    log_likelihoods: list[float]  # mean per-sample log-likelihood before each M-step
    converged: bool
    n_iter: int
    stats: object


def chunk_rows(n_components: int, n_features: int, batch=None) -> int:
    design = getattr(batch, "design", None)
    if design is not None:
        # diag / spherical with a cached design: a chunk's temporaries are its (K, rows) log-densities
        # only, and fewer, longer chunks pay the per-chunk call overhead less often (BLAS holds to
        # one thread during EM, so the threading threshold above does not apply): 4096 rows
        return max(64, min(_MAX_DESIGN_CHUNK_ROWS, _CHUNK_ELEMENTS // (n_components + design.shape[1])))
    width = max(n_components * (n_features + 1), n_features * n_features, 1)
    return max(64, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // width))


def accumulate(family, batch, params, chunk_size: int | None = None):
    """E-step over `batch` in row chunks, then its statistics: (stats, total log-likelihood).

    The E-step's (rows, K * d) temporaries are chunked to stay in cache; the
    responsibilities are only (n, K), so the statistics are then one matrix
    product over the whole batch rather than one per chunk.
    """
    if getattr(batch, "has_missing", False):  # missing features: the family's marginalising E-step
        log_norm, _, stats = family.expected_stats(batch, params)
        return stats, float(log_norm.sum())
    n = batch.n_samples
    size = chunk_size or n
    # column-major, as the families' E-steps return responsibilities: each chunk is copied in
    # component by component, and the statistics' products read resp.T as contiguous rows
    resp = np.empty((n, params.weights.shape[0]), order="F")
    total_log_likelihood = 0.0
    for start in range(0, n, size):
        weighted = family.weighted_log_prob(batch[start : start + size], params)
        log_norm, _ = responsibilities(weighted, out=resp[start : start + size])
        total_log_likelihood += float(np.add.reduce(log_norm))
    return family.suff_stats(batch, resp), total_log_likelihood


def run_em(family, batch, params, *, tol: float, max_iter: int, n_features: int) -> EMResult:
    """Iterate EM from `params` until the mean log-likelihood changes by less than `tol`."""
    n = batch.n_samples
    size = chunk_rows(_n_components(params), n_features, batch)
    log_likelihoods: list[float] = []
    previous = -math.inf
    converged = False
    stats = None
    for iteration in range(1, max_iter + 1):
        with single_threaded_blas():
            stats, total = accumulate(family, batch, params, size)
        mean_log_likelihood = total / n
        log_likelihoods.append(mean_log_likelihood)
        params = family.m_step(stats)
        logger.debug("EM iteration %d: mean log-likelihood %.8f", iteration, mean_log_likelihood)
        if abs(mean_log_likelihood - previous) < tol:
            converged = True
            break
        previous = mean_log_likelihood
    return EMResult(params, log_likelihoods, converged, len(log_likelihoods), stats)


def fit_with_restarts(
    family,
    batch,
    initial_params: Callable[[np.random.Generator], object],
    *,
    n_init: int,
    tol: float,
    max_iter: int,
    n_features: int,
    rng: np.random.Generator,
) -> EMResult:
    """Run EM from `n_init` starts and keep the one with the highest final log-likelihood."""
    best: EMResult | None = None
    for restart in range(n_init):
        result = run_em(family, batch, initial_params(rng), tol=tol, max_iter=max_iter, n_features=n_features)
        logger.info(
            "EM start %d/%d: %d iterations, log-likelihood %.6f%s",
            restart + 1,
            n_init,
            result.n_iter,
            result.log_likelihoods[-1],
            "" if result.converged else " (not converged)",
        )
        if best is None or result.log_likelihoods[-1] > best.log_likelihoods[-1]:
            best = result
    if best is None:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    return best


def _n_components(params) -> int:
    return params.weights.shape[0]
