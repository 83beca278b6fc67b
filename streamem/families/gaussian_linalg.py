"""Layout helpers the Gaussian family and its missing-value E-step share.

They sit in their own module so that `gaussian` (the family) and `gaussian_missing` (the
marginalising E-step it calls) both import them, and neither imports the other's insides.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "LOG_2PI",
    "component_covariance",
    "full_covariances",
    "symmetric_index",
    "unpack_symmetric",
    "upper_triangle",
]

LOG_2PI = math.log(2.0 * math.pi)


@functools.lru_cache(maxsize=64)
def upper_triangle(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a d x d upper triangle, row by row (read-only, cached: the
    online update needs them per mini-batch and building them cost half of a small model's update)."""
    rows, cols = np.triu_indices(d)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


@functools.lru_cache(maxsize=64)
def symmetric_index(d: int) -> np.ndarray:
    """(d * d,) position in the packed upper triangle of each entry (i, j) of a d x d symmetric
    matrix, row-major: `packed[:, symmetric_index(d)]` unpacks in one gather (read-only, cached)."""
    rows, cols = upper_triangle(d)
    index = np.empty((d, d), dtype=np.intp)
    index[rows, cols] = index[cols, rows] = np.arange(rows.size)
    index = index.ravel()
    index.flags.writeable = False
    return index


def unpack_symmetric(packed: np.ndarray, d: int) -> np.ndarray:
    """(K, d (d + 1) / 2) upper triangles -> (K, d, d) symmetric matrices (a new array)."""
    return packed[:, symmetric_index(d)].reshape(packed.shape[0], d, d)


def full_covariances(params) -> np.ndarray:
    """Every component's covariance of Gaussian parameters as a (K, d, d) array, whatever the type."""
    return np.stack([component_covariance(params, k) for k in range(params.n_components)])


def component_covariance(params, k: int) -> np.ndarray:
    """Component k's (d, d) covariance of Gaussian parameters, whatever the type."""
    cov = params.covariances
    kind = params.covariance_type
    if kind == "full":
        return cov[k]
    if kind == "tied":
        return cov
    if kind == "diag":
        return np.diag(cov[k])
    return np.eye(params.n_features) * cov[k]
