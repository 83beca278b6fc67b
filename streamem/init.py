"""Initial responsibilities for EM: k-means++ seeding with a few Lloyd steps, or random.

The seeding follows Arthur & Vassilvitskii (2007) with greedy local trials, as
scikit-learn's `kmeans_plusplus` does: each new centre is the best of
`2 + log K` candidates drawn with probability proportional to D(x)^2.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["INIT_METHODS", "initial_responsibilities", "kmeans", "kmeans_plusplus"]

INIT_METHODS = ("kmeans++", "random", "random_from_data")


def kmeans_plusplus(X: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Pick `n_clusters` rows of `X` (n, d) as seeds; returns centres (K, d)."""
    n = X.shape[0]
    n_trials = 2 + int(math.log(n_clusters))
    squared_norms = np.einsum("ij,ij->i", X, X)
    centres = np.empty((n_clusters, X.shape[1]))
    centres[0] = X[rng.integers(n)]
    closest = _squared_distances(X, squared_norms, centres[:1])[:, 0]
    for k in range(1, n_clusters):
        total = closest.sum()
        if total <= 0.0:  # every point sits on a centre already: fewer distinct points than K
            candidates = rng.integers(n, size=n_trials)
        else:
            candidates = np.searchsorted(np.cumsum(closest), rng.random(n_trials) * total)
            candidates = np.minimum(candidates, n - 1)
        distances = np.minimum(closest[:, None], _squared_distances(X, squared_norms, X[candidates]))
        best = int(np.argmin(distances.sum(axis=0)))
        centres[k] = X[candidates[best]]
        closest = distances[:, best]
    return centres


def kmeans(X: np.ndarray, n_clusters: int, rng: np.random.Generator, max_iter: int = 20) -> np.ndarray:
    """Lloyd's k-means from k-means++ seeds; returns labels (n,)."""
    centres = kmeans_plusplus(X, n_clusters, rng)
    squared_norms = np.einsum("ij,ij->i", X, X)
    labels = np.argmin(_squared_distances(X, squared_norms, centres), axis=1)
    for _ in range(max_iter):
        counts = np.bincount(labels, minlength=n_clusters)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, X)
        filled = counts > 0  # an empty cluster keeps its previous centre
        centres[filled] = sums[filled] / counts[filled, None]
        new_labels = np.argmin(_squared_distances(X, squared_norms, centres), axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def initial_responsibilities(X: np.ndarray, n_components: int, method: str, rng: np.random.Generator) -> np.ndarray:
    """Responsibilities (n, K) to start EM from, by `method` (see `INIT_METHODS`)."""
    n = X.shape[0]
    if method == "kmeans++":
        labels = kmeans(X, n_components, rng)
    elif method == "random_from_data":
        seeds = X[rng.choice(n, size=n_components, replace=n < n_components)]
        labels = np.argmin(_squared_distances(X, np.einsum("ij,ij->i", X, X), seeds), axis=1)
    elif method == "random":
        resp = rng.uniform(size=(n, n_components))
        return resp / resp.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {method!r}")
    resp = np.zeros((n, n_components))
    resp[np.arange(n), labels] = 1.0
    return resp


def _squared_distances(X: np.ndarray, squared_norms: np.ndarray, centres: np.ndarray) -> np.ndarray:
    distances = squared_norms[:, None] - 2.0 * (X @ centres.T) + np.einsum("ij,ij->i", centres, centres)
    return np.maximum(distances, 0.0)
