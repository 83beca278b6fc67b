"""Compiled (numba) kernels of a cold model's answers: the provisional mixture and the warm-up screen.

Why: a model that has not finished its warm-up answers with provisional parameters rebuilt from
its buffer on every call (means the first K buffered rows, every component's covariance the
buffer's diagonal variance). One model per key (the Kafka consumer's `--model-key`) makes
thousands of such calls on one or two rows each, and in NumPy each is some forty small calls
paying ~1-3 us of overhead apiece for a few hundred flops. Here it is one call.

The variance is the two-pass population variance NumPy's `var` computes, but summed in plain
order (not NumPy's pairwise blocks), and the log-densities are taken about the origin, not
about the mixture's mean: the answers agree with the general path's to the last few bits only.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["cold_answers_each", "provisional_scores", "robust_distances", "warm_up_cold_kernels"]

_JIT = {"cache": True, "nogil": True}
_LOG_2PI = math.log(2.0 * math.pi)


@numba.njit(**_JIT)
def provisional_scores(buffer, count, rows, n_components, spherical):
    """(log-likelihood (n,), log-responsibilities (n, K), finite) of `rows` under the provisional
    mixture of `buffer[:count]`: equal weights, means buffer[k % count] (the origin when nothing is
    buffered), each component's covariance diag(variance of the buffered rows): 1 where that is 0
    or with fewer than two rows; with `spherical`, every feature the mean of those. `finite` is
    False when the variance or the means are not finite (the caller takes the general path then)."""
    n, d = rows.shape
    K = n_components
    variance = np.ones(d)
    if count > 1:
        for j in range(d):
            total = 0.0
            for i in range(count):
                total += buffer[i, j]
            mean = total / count
            squares = 0.0
            for i in range(count):
                gap = buffer[i, j] - mean
                squares += gap * gap
            value = squares / count
            variance[j] = value if value > 0.0 or value != value else 1.0  # NaN stays: `finite` says so
    if spherical:
        variance[:] = variance.sum() / d
    means = np.zeros((K, d))
    if count > 0:
        for k in range(K):
            means[k] = buffer[k % count]
    log_likelihood = np.empty(n)
    log_resp = np.empty((n, K))
    finite = True
    for j in range(d):
        if not math.isfinite(variance[j]):
            finite = False
    for k in range(K):
        for j in range(d):
            if not math.isfinite(means[k, j]):
                finite = False
    if not finite:
        return log_likelihood, log_resp, False
    root = 1.0 / np.sqrt(variance)
    constant = -0.5 * d * _LOG_2PI - math.log(K)
    for j in range(d):
        constant += math.log(root[j])
    for i in range(n):
        top = -np.inf
        for k in range(K):
            quadratic = 0.0
            for j in range(d):
                z = (rows[i, j] - means[k, j]) * root[j]
                quadratic += z * z
            value = constant - 0.5 * quadratic
            log_resp[i, k] = value
            if value > top:
                top = value
        total = 0.0
        for k in range(K):
            total += math.exp(log_resp[i, k] - top)
        norm = top + math.log(total)
        log_likelihood[i] = norm
        for k in range(K):
            log_resp[i, k] -= norm
    return log_likelihood, log_resp, True


@numba.njit(**_JIT)
def robust_distances(rows, centre, scale):
    """(squared robust distance (n,), feature contributing most (n,)) of rows from a warm-up
    reference: sum_j ((x_j - centre_j) / scale_j)^2, a NaN term counting 0 (`outliers.robust_distance`)."""
    n, d = rows.shape
    distance = np.zeros(n)
    blame = np.zeros(n, dtype=np.int64)
    for i in range(n):
        most = -1.0
        for j in range(d):
            z = (rows[i, j] - centre[j]) / scale[j]
            z = z * z
            if z != z:
                z = 0.0
            distance[i] += z
            if z > most:
                most = z
                blame[i] = j
    return distance, blame


@numba.njit(**_JIT)
def _answer_and_screen(buffer, count, rows, n_components, spherical, centre, scale, threshold, too_large):
    """One cold model's answer to rows and its warm-up screen: (log-responsibilities, log-likelihood,
    distance, blame, outlier, status).

    The answer is `provisional_scores`'; the distances `robust_distances`' from the reference
    (`centre`, `scale`; every distance 0 when `centre` is empty); a row is an outlier when its
    distance is not <= `threshold`. Status 1: no row is an outlier; 2: some are; 0: a value is NaN
    or not below `too_large` in size, or the provisional parameters are not finite, and nothing else
    is computed (the caller's general path answers and screens those rows). The caller takes the
    exponential with NumPy, as the general path does: a compiled exp may differ in the last bit."""
    n, d = rows.shape
    distance = np.zeros(n)
    blame = np.zeros(n, dtype=np.int64)
    outlier = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        for j in range(d):
            if not (rows[i, j] < too_large and rows[i, j] > -too_large):  # NaN: not <
                return np.empty((0, n_components)), np.empty(0), distance, blame, outlier, 0
    log_likelihood, log_resp, finite = provisional_scores(buffer, count, rows, n_components, spherical)
    if not finite:
        return log_resp, log_likelihood, distance, blame, outlier, 0
    if centre.shape[0]:
        distance, blame = robust_distances(rows, centre, scale)
    status = 1
    for i in range(n):
        if not distance[i] <= threshold:
            outlier[i] = True
            status = 2
    return log_resp, log_likelihood, distance, blame, outlier, status


@numba.njit(**_JIT)
def cold_answers_each(buffers, buffer_starts, rows, row_starts, n_components, spherical, centres, scales,
                      referenced, thresholds, too_large):
    """The answers and warm-up screens of many cold models at once (nothing is buffered here): model
    g's buffered rows are
    `buffers[buffer_starts[g]:buffer_starts[g + 1]]`, its rows `rows[row_starts[g]:row_starts[g + 1]]`,
    its reference `centres[g]`, `scales[g]` where `referenced[g]`, its threshold `thresholds[g]`.
    Returns the rows' (log-responsibilities, log-likelihoods, distances, blame, outlier) and each
    model's status (the rows of a model with status 0 hold nothing)."""
    n, d = rows.shape
    G = row_starts.shape[0] - 1
    log_resp = np.zeros((n, n_components))
    log_likelihood = np.zeros(n)
    distance = np.zeros(n)
    blame = np.zeros(n, dtype=np.int64)
    outlier = np.zeros(n, dtype=np.bool_)
    status = np.zeros(G, dtype=np.int64)
    none = np.zeros(0)
    for g in range(G):
        a, b = row_starts[g], row_starts[g + 1]
        buffered = buffers[buffer_starts[g] : buffer_starts[g + 1]]
        centre, scale = (centres[g], scales[g]) if referenced[g] else (none, none)
        answer = _answer_and_screen(
            buffered, buffered.shape[0], rows[a:b], n_components, spherical, centre, scale, thresholds[g], too_large
        )
        status[g] = answer[5]
        if answer[5] != 0:
            log_resp[a:b] = answer[0]
            log_likelihood[a:b] = answer[1]
            distance[a:b] = answer[2]
            blame[a:b] = answer[3]
            outlier[a:b] = answer[4]
    return log_resp, log_likelihood, distance, blame, outlier, status


def warm_up_cold_kernels() -> None:
    """Compile (or load from the cache) these kernels now, on tiny inputs of the types the hot path uses."""
    rows = np.zeros((1, 2))
    provisional_scores(np.zeros((4, 2)), 2, rows, 2, False)
    robust_distances(rows, np.zeros(2), np.ones(2))
    starts = np.array([0, 1])
    cold_answers_each(
        np.zeros((1, 2)), starts, rows, starts, 2, False, np.zeros((1, 2)), np.ones((1, 2)),
        np.ones(1, dtype=np.bool_), np.ones(1), 1e150,
    )
