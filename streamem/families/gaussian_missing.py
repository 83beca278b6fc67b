"""Gaussian mixture E-step with missing features, by exact marginalisation.

For a record with observed features o and missing features m, component k gives
(Ghahramani & Jordan 1994):

- the marginal density N(x_o | mu_o, S_oo), which sets the responsibilities;
- the conditional mean x^_m = mu_m + S_mo S_oo^-1 (x_o - mu_o) and covariance
  C = S_mm - S_mo S_oo^-1 S_om, so the expected statistics of the record are those
  of the filled-in vector [x_o, x^_m], plus C added to its second moment.

Records are grouped by their pattern of missing features; each group is one
batched computation over its records and all components. Every covariance type
goes through its full (K, d, d) form here; the family (`gaussian.GaussianFamily`)
packs the moments into its statistics, so this module needs nothing from it.
"""

from __future__ import annotations

import numpy as np

from streamem.families.base import responsibilities
from streamem.families.gaussian_linalg import LOG_2PI, full_covariances

__all__ = ["conditional_fill", "missing_e_step"]


def _patterns(missing: np.ndarray):
    """Yield (rows, observed index, missing index) per distinct pattern of missing features."""
    patterns, inverse = np.unique(missing, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        yield np.flatnonzero(inverse.ravel() == p), np.flatnonzero(~pattern), np.flatnonzero(pattern)


def _group(X, rows, observed, missing_idx, means, covs, log_weights):
    """Weighted log-probabilities (g, K) and each component's conditional fill-in of the group."""
    x_o = X[np.ix_(rows, observed)]  # (g, o)
    mu_o = means[:, observed]  # (K, o)
    S_oo = covs[:, observed][:, :, observed]  # (K, o, o)
    S_mo = covs[:, missing_idx][:, :, observed]  # (K, m, o)
    S_mm = covs[:, missing_idx][:, :, missing_idx]  # (K, m, m)
    lower = np.linalg.cholesky(S_oo)
    residual = x_o[None, :, :] - mu_o[:, None, :]  # (K, g, o)
    whitened = np.linalg.solve(lower, residual.transpose(0, 2, 1))  # (K, o, g)
    mahalanobis = (whitened**2).sum(axis=1).T  # (g, K)
    log_det = 2.0 * np.log(np.diagonal(lower, axis1=1, axis2=2)).sum(axis=1)
    weighted = -0.5 * (len(observed) * LOG_2PI + log_det + mahalanobis) + log_weights
    # gain A_k = S_mo S_oo^-1, via the Cholesky factor: A^T = S_oo^-1 S_om
    gain = np.linalg.solve(S_oo, S_mo.transpose(0, 2, 1)).transpose(0, 2, 1)  # (K, m, o)
    fill = means[:, None, missing_idx] + residual @ gain.transpose(0, 2, 1)  # (K, g, m)
    conditional_cov = S_mm - gain @ S_mo.transpose(0, 2, 1)  # (K, m, m)
    return weighted, fill, conditional_cov


def missing_e_step(X: np.ndarray, shift: np.ndarray, params):
    """E-step and expected moments for records X (n, d) with NaN where a feature is missing.

    `params`: Gaussian mixture parameters (`gaussian.GaussianParams`). Returns (per-record
    log-likelihood (n,), responsibilities (n, K), mass (K,), first moments (K, d) and full second
    moments (K, d, d) about `shift`). Every record must have at least one observed feature.
    """
    n, d = X.shape
    K = params.means.shape[0]
    missing = np.isnan(X)
    if np.any(missing.all(axis=1)):
        raise ValueError(f"record {int(np.argmax(missing.all(axis=1)))} has no observed feature")
    means, covs = params.means, full_covariances(params)
    with np.errstate(divide="ignore"):
        log_weights = np.log(params.weights)
    log_norm = np.empty(n)
    resp = np.empty((n, K))
    mass = np.zeros(K)
    first = np.zeros((K, d))
    second = np.zeros((K, d, d))
    for rows, observed, missing_idx in _patterns(missing):
        weighted, fill, conditional_cov = _group(X, rows, observed, missing_idx, means, covs, log_weights)
        group_norm, group_resp = responsibilities(weighted)
        log_norm[rows], resp[rows] = group_norm, group_resp
        filled = np.repeat(X[rows][None], K, axis=0)  # (K, g, d)
        filled[:, :, missing_idx] = fill
        filled -= shift
        weights = group_resp.T[:, :, None]  # (K, g, 1)
        group_mass = group_resp.sum(axis=0)
        mass += group_mass
        first += (weights * filled).sum(axis=1)
        second += (weights * filled).transpose(0, 2, 1) @ filled
        if len(missing_idx):
            second[np.ix_(range(K), missing_idx, missing_idx)] += group_mass[:, None, None] * conditional_cov
    return log_norm, resp, mass, first, second


def conditional_fill(X: np.ndarray, params) -> np.ndarray:
    """X with each missing feature replaced by E[x_m | x_o] = sum_k p(k | x_o) x^_m,k."""
    out = np.array(X, dtype=float)
    missing = np.isnan(out)
    if not missing.any():
        return out
    means, covs = params.means, full_covariances(params)
    with np.errstate(divide="ignore"):
        log_weights = np.log(params.weights)
    for rows, observed, missing_idx in _patterns(missing):
        if not len(missing_idx):
            continue
        if not len(observed):  # nothing observed: the mixture's mean
            out[np.ix_(rows, missing_idx)] = params.weights @ means[:, missing_idx]
            continue
        weighted, fill, _ = _group(out, rows, observed, missing_idx, means, covs, log_weights)
        group_resp = responsibilities(weighted)[1]  # (g, K)
        out[np.ix_(rows, missing_idx)] = np.einsum("gk,kgm->gm", group_resp, fill)
    return out
