"""Compiled (numba) kernels of the full-covariance Gaussian family's per-mini-batch path.

Why: an online update of a small model (d = 10, K = 8, 128 records) is about a hundred NumPy
calls on arrays of a few hundred values, each paying ~1-3 us of call overhead for well under a
microsecond of arithmetic. Here each stage is one call: the component log-densities, the
responsibilities with the batch's moments, and the stepwise blend with its re-centring and the
M-step (one Cholesky factorisation per component).

The blend, the hold of dead components, the re-centring and the M-step's arithmetic repeat the
NumPy code's operations in the same order (sums over components as `np.add.reduce` orders them),
so they give the same numbers; the Cholesky factors and the E-step's dot products sum in another
order than LAPACK and BLAS, which moves their last bits only.

Compiling them all takes about 10 s once per machine (numba's on-disk cache then loads them in
0.4 s); the family compiles them all at its first use of one, a model's warm-up fit
(`warm_up_kernels`), so no mini-batch waits for a compilation.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "MAX_WIDTH",
    "blend_full",
    "closest_distance",
    "full_log_prob",
    "full_m_step",
    "full_moments",
    "learn_answered_full",
    "log_weights",
    "screen_full",
    "update_full",
    "warm_up_kernels",
]

_JIT = {"cache": True, "nogil": True}

# Components and features at most: NumPy sums more than 128 values in blocks (a recursion, which
# numba's cache cannot hold), so wider models take the NumPy path.
MAX_WIDTH = 128


@numba.njit(**_JIT)
def _pairwise_sum(values, n, start, stride):
    """`np.add.reduce` of values[start : start + n * stride : stride], summed in NumPy's order (its
    pairwise sum: eight accumulators) for n <= 128 (`MAX_WIDTH`: the callers check)."""
    if n < 8:
        total = -0.0
        for i in range(n):
            total += values[start + i * stride]
        return total
    r = np.empty(8)
    for j in range(8):
        r[j] = values[start + j * stride]
    i = 8
    while i < n - (n % 8):
        for j in range(8):
            r[j] += values[start + (i + j) * stride]
        i += 8
    total = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        total += values[start + i * stride]
        i += 1
    return total


@numba.njit(**_JIT)
def full_log_prob(centred, means, chol, constant):
    """log N(x | mean_k, cov_k), (K, n): centred records (n, d), means about the same shift (K, d),
    upper-triangular precision Cholesky factors P_k (K, d, d), constant_k = log det P_k - d/2 log 2 pi.

    The whitened residual of component k, feature j, is sum_{i <= j} (u_i - m_ki) P_k[i, j]; the loops
    run over records innermost, so they vectorise."""
    n, d = centred.shape
    K = means.shape[0]
    by_feature = np.empty((d, n))
    for m in range(n):
        for i in range(d):
            by_feature[i, m] = centred[m, i]
    out = np.empty((K, n))
    total = np.empty(n)
    whitened = np.empty(n)
    for k in range(K):
        total[:] = 0.0
        for j in range(d):
            offset = 0.0
            for i in range(j + 1):
                offset += means[k, i] * chol[k, i, j]
            whitened[:] = -offset
            for i in range(j + 1):
                factor = chol[k, i, j]
                row = by_feature[i]
                for m in range(n):
                    whitened[m] += factor * row[m]
            for m in range(n):
                total[m] += whitened[m] * whitened[m]
        for m in range(n):
            out[k, m] = -0.5 * total[m] + constant[k]
    return out


@numba.njit(**_JIT)
def closest_distance(log_prob, constant, threshold):
    """Squared Mahalanobis distance of each record to its closest component, max(-2 max_k (log N_k - c_k), 0),
    from log-densities (K, n), and how many records are not within `threshold` (NaN counts as far)."""
    K, n = log_prob.shape
    distance = np.empty(n)
    far = 0
    for m in range(n):
        best = log_prob[0, m] - constant[0]
        for k in range(1, K):
            value = log_prob[k, m] - constant[k]
            if value > best:
                best = value
        value = -2.0 * best
        if not value <= threshold:
            far += 1
        distance[m] = 0.0 if value < 0.0 else value  # rounding can take it below 0; NaN stays NaN
    return distance, far


@numba.njit(**_JIT)
def screen_full(rows, shift, means, chol, log_det, half_log_2pi, threshold):
    """The outlier screen of a mini-batch and its log-densities in one call: rows - shift (n, d), the
    log-densities (K, n) as `full_log_prob` gives them (constant log_det - half_log_2pi), and how many
    records are farther than `threshold` from their closest component (`closest_distance`)."""
    n, d = rows.shape
    K = means.shape[0]
    centred = np.empty((n, d))
    for m in range(n):
        for i in range(d):
            centred[m, i] = rows[m, i] - shift[i]
    centred_means = np.empty((K, d))
    constant = np.empty(K)
    for k in range(K):
        for i in range(d):
            centred_means[k, i] = means[k, i] - shift[i]
        constant[k] = log_det[k] - half_log_2pi
    log_prob = full_log_prob(centred, centred_means, chol, constant)
    far = closest_distance(log_prob, constant, threshold)[1]
    return centred, log_prob, far


@numba.njit(**_JIT)
def _normalise(weighted, log_weights):
    """log N(x | k) (K, n) -> responsibilities, in place (log w_k added first); returns each record's
    log-likelihood."""
    K, n = weighted.shape
    for k in range(K):
        for m in range(n):
            weighted[k, m] += log_weights[k]
    top = weighted[0].copy()
    for k in range(1, K):
        for m in range(n):
            if weighted[k, m] > top[m]:
                top[m] = weighted[k, m]
    sums = np.zeros(n)
    for k in range(K):
        for m in range(n):
            value = math.exp(weighted[k, m] - top[m])
            weighted[k, m] = value
            sums[m] += value
    log_norm = np.empty(n)
    for m in range(n):
        log_norm[m] = math.log(sums[m]) + top[m]
        sums[m] = 1.0 / sums[m]
    for k in range(K):
        for m in range(n):
            weighted[k, m] *= sums[m]
    return log_norm


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _moments(resp, centred):
    """mass (K,), first (K, d) and packed second moments (K, d (d + 1) / 2) of centred records (n, d)
    weighted by responsibilities (K, n): sums over records, reassociated so that they vectorise."""
    K, n = resp.shape
    d = centred.shape[1]
    P = d * (d + 1) // 2
    by_feature = np.empty((d, n))
    for m in range(n):
        for i in range(d):
            by_feature[i, m] = centred[m, i]
    products = np.empty((P, n))
    p = 0
    for i in range(d):
        for j in range(i, d):
            a, b, out = by_feature[i], by_feature[j], products[p]
            for m in range(n):
                out[m] = a[m] * b[m]
            p += 1
    mass = np.empty(K)
    first = np.empty((K, d))
    second = np.empty((K, P))
    for k in range(K):
        r = resp[k]
        total = 0.0
        for m in range(n):
            total += r[m]
        mass[k] = total
        for i in range(d):
            a = by_feature[i]
            total = 0.0
            for m in range(n):
                total += r[m] * a[m]
            first[k, i] = total
        for p in range(P):
            a = products[p]
            total = 0.0
            for m in range(n):
                total += r[m] * a[m]
            second[k, p] = total
    return mass, first, second


@numba.njit(**_JIT)
def answered_moments(rows, shift, resp):
    """mass (K,), first (K, d) and packed second moments (K, d (d + 1) / 2) of records (n, d) about `shift`,
    weighted by the responsibilities they were answered with (K, n)."""
    n, d = rows.shape
    centred = np.empty((n, d))
    for m in range(n):
        for i in range(d):
            centred[m, i] = rows[m, i] - shift[i]
    return _moments(resp, centred)


@numba.njit(**_JIT)
def full_moments(log_prob, log_weights, centred):
    """Responsibilities and moments from the log-densities log N(x | k), (K, n) (overwritten with the
    responsibilities) and the log-weights (K,): returns (log-likelihood (n,), mass (K,), first (K, d),
    second (K, d (d + 1) / 2), the upper triangles packed row by row)."""
    weighted = log_prob
    log_norm = _normalise(weighted, log_weights)
    mass, first, second = _moments(weighted, centred)
    return log_norm, mass, first, second


@numba.njit(**_JIT)
def full_m_step(shift, mass, first, second, reg_covar):
    """The M-step of `GaussianFamily.m_step` for full covariances, in its order of operations: returns
    (weights, means, covariances, precision Cholesky factors, log det of each, halved, ok). `ok` is
    False when a covariance is not finite or not positive definite, or a weight not finite (the caller
    then takes the NumPy path, which repairs or raises)."""
    K, d = first.shape
    floor = 10 * np.finfo(np.float64).eps  # MASS_FLOOR
    floored = np.empty(K)
    for k in range(K):
        floored[k] = mass[k] + floor
    total = _pairwise_sum(floored, K, 0, 1)
    weights = np.empty(K)
    means = np.empty((K, d))
    offsets = np.empty((K, d))
    cov = np.empty((K, d, d))
    chol = np.zeros((K, d, d))
    log_det = np.empty(K)
    lower = np.zeros((d, d))
    logs = np.empty(d)
    ok = True
    for k in range(K):
        weights[k] = floored[k] / total
        if not (weights[k] >= 0.0 and weights[k] < np.inf):
            ok = False
        for i in range(d):
            offsets[k, i] = first[k, i] / floored[k]
            means[k, i] = shift[i] + offsets[k, i]
        p = 0
        for i in range(d):
            for j in range(i, d):
                value = second[k, p] / floored[k] - offsets[k, i] * offsets[k, j]
                cov[k, i, j] = value
                cov[k, j, i] = value
                p += 1
        for i in range(d):
            cov[k, i, i] += reg_covar
        # Cholesky S = L L^T, then P = L^-T (upper triangular) by forward substitution
        for j in range(d):
            s = cov[k, j, j]
            for i in range(j):
                s -= lower[j, i] * lower[j, i]
            if not (s > 0.0 and s < np.inf):
                ok = False
                s = 1.0
            pivot = math.sqrt(s)
            lower[j, j] = pivot
            for r in range(j + 1, d):
                t = cov[k, r, j]
                for i in range(j):
                    t -= lower[r, i] * lower[j, i]
                lower[r, j] = t / pivot
        # inverse of L, column by column: column c of L^-1 is row c of P
        for c in range(d):
            chol[k, c, c] = 1.0 / lower[c, c]
            for r in range(c + 1, d):
                t = 0.0
                for i in range(c, r):
                    t -= lower[r, i] * chol[k, c, i]
                chol[k, c, r] = t / lower[r, r]
        for i in range(d):
            logs[i] = math.log(chol[k, i, i])
        log_det[k] = _pairwise_sum(logs, d, 0, 1)
        if not math.isfinite(log_det[k]):
            ok = False
    return weights, means, cov, chol, log_det, ok


@numba.njit(**_JIT)
def log_weights(weights):
    """np.log of the weights (the same numbers: both call the C library's log; log 0 = -inf)."""
    out = np.empty(weights.shape[0])
    for k in range(weights.shape[0]):
        out[k] = math.log(weights[k]) if weights[k] > 0.0 else (-np.inf if weights[k] == 0.0 else np.nan)
    return out


@numba.njit(**_JIT)
def blend_full(shift, mass, first, second, b_mass, b_first, b_second, keep, take, dead_mass):
    """`SufficientStatistics.blend`, `_hold_dead_components` and `recentred(data_mean())` of packed
    Gaussian statistics in one pass, in the NumPy code's order: returns (shift, mass, first, second).
    The batch's statistics are about the same shift as the running ones."""
    K, d = first.shape
    P = second.shape[1]
    floor = 10 * np.finfo(np.float64).eps  # MASS_FLOOR
    new_mass = np.empty(K)
    new_first = np.empty((K, d))
    new_second = np.empty((K, P))
    for k in range(K):
        new_mass[k] = keep * mass[k] + take * b_mass[k]
        for i in range(d):
            new_first[k, i] = keep * first[k, i] + take * b_first[k, i]
        for p in range(P):
            new_second[k, p] = keep * second[k, p] + take * b_second[k, p]
    for k in range(K):
        if new_mass[k] < dead_mass:  # held at the floor, its mean and covariance unchanged
            factor = dead_mass / max(new_mass[k], floor)
            new_mass[k] *= factor
            for i in range(d):
                new_first[k, i] *= factor
            for p in range(P):
                new_second[k, p] *= factor
    # data_mean: shift + sum_k first_k / max(sum_k mass_k, floor), the sum over k row after row
    column = np.empty(d)
    for i in range(d):
        column[i] = new_first[0, i]
    for k in range(1, K):
        for i in range(d):
            column[i] += new_first[k, i]
    total = max(_pairwise_sum(new_mass, K, 0, 1), floor)
    centre = np.empty(d)
    delta = np.empty(d)
    for i in range(d):
        centre[i] = shift[i] + column[i] / total
        delta[i] = shift[i] - centre[i]
    # recentred: f' = m delta + f; packed s' = (f'_i delta_j + delta_i f_j) + s
    out_first = np.empty((K, d))
    out_second = np.empty((K, P))
    for k in range(K):
        for i in range(d):
            out_first[k, i] = new_mass[k] * delta[i] + new_first[k, i]
        p = 0
        for i in range(d):
            for j in range(i, d):
                out_second[k, p] = (out_first[k, i] * delta[j] + delta[i] * new_first[k, j]) + new_second[k, p]
                p += 1
    return centre, new_mass, out_first, out_second


@numba.njit(**_JIT)
def update_full(shift, mass, first, second, b_mass, b_first, b_second, keep, take, dead_mass, reg_covar):
    """`blend_full` then `full_m_step` of its statistics, in one call: returns the four statistics
    fields, the values of `full_m_step` but `ok`, the log-weights, then `ok`."""
    blended = blend_full(shift, mass, first, second, b_mass, b_first, b_second, keep, take, dead_mass)
    weights, means, cov, chol, log_det, ok = full_m_step(blended[0], blended[1], blended[2], blended[3], reg_covar)
    logs = log_weights(weights)
    return blended[0], blended[1], blended[2], blended[3], weights, means, cov, chol, log_det, logs, ok


@numba.njit(**_JIT)
def learn_answered_full(
    rows, resp, head, size, shift, mass, first, second, p_mass, p_first, p_second, keeps, steps, min_count, dead_mass,
    reg_covar,
):
    """Stepwise updates from the whole mini-batches of `size` answered rows (n, d), their responsibilities
    (K, n) given: for mini-batch c, its moments about the running shift, then `update_full` with weights
    `keeps[c]` and `steps[c] / count`. With `head` > 0 the first mini-batch is the first `head` rows plus the
    moments pooled before them (`p_mass`, `p_first`, `p_second`, about `shift`), and whole mini-batches
    follow it. Stops before a mini-batch summarising fewer than `min_count` records or one whose M-step the
    NumPy path must make (the caller takes it from there). Returns (mini-batches learned, the four statistics
    fields, then `update_full`'s weights, means, covariances, Cholesky factors, log-determinants and
    log-weights) of the last update (those given, unchanged, when none was made)."""
    K, d = first.shape
    weights = np.empty(K)
    means = np.empty((K, d))
    cov = np.empty((K, d, d))
    chol = np.empty((K, d, d))
    log_det = np.empty(K)
    logs = np.empty(K)
    done = 0
    for c in range(keeps.shape[0]):
        if head > 0:
            start, length = (0, head) if c == 0 else (head + (c - 1) * size, size)
        else:
            start, length = c * size, size
        centred = np.empty((length, d))
        for m in range(length):
            for i in range(d):
                centred[m, i] = rows[start + m, i] - shift[i]
        b_mass, b_first, b_second = _moments(np.ascontiguousarray(resp[:, start : start + length]), centred)
        if head > 0 and c == 0:  # the pool completed (pooled + these, as `SufficientStatistics.__add__` adds)
            b_mass, b_first, b_second = p_mass + b_mass, p_first + b_first, p_second + b_second
        count = _pairwise_sum(b_mass, K, 0, 1)
        if not count >= min_count:
            break
        take = steps[c] * (1.0 / count)
        out = update_full(shift, mass, first, second, b_mass, b_first, b_second, keeps[c], take, dead_mass, reg_covar)
        if not out[10]:
            break
        shift, mass, first, second = out[0], out[1], out[2], out[3]
        weights, means, cov, chol, log_det, logs = out[4], out[5], out[6], out[7], out[8], out[9]
        done += 1
    return done, shift, mass, first, second, weights, means, cov, chol, log_det, logs


def warm_up_kernels() -> None:
    """Compile (or load from the cache) every kernel now, on tiny inputs of the types the hot path uses."""
    if compiled[0]:
        return
    d, K, n = 2, 2, 3
    centred = np.zeros((n, d))
    means = np.zeros((K, d))
    chol = np.broadcast_to(np.eye(d), (K, d, d)).copy()
    weighted = full_log_prob(centred, means, chol, np.zeros(K))
    closest_distance(weighted, np.zeros(K), 1.0)
    screen_full(centred, np.zeros(d), means, chol, np.zeros(K), 1.0, 1.0)
    full_moments(weighted, np.zeros(K), centred)
    answered_moments(centred, np.zeros(d), np.full((K, n), 0.5))
    mass, first, second = np.ones(K), np.zeros((K, d)), np.ones((K, 3))
    full_m_step(np.zeros(d), mass, first, second, 1e-6)
    update_full(np.zeros(d), mass, first, second, mass, first, second, 0.5, 0.5, 1e-8, 1e-6)
    learn_answered_full(centred, np.full((K, n), 0.5), 0, n, np.zeros(d), mass, first, second, mass, first, second,
                        np.full(1, 0.5), np.full(1, 0.5), 1.0, 1e-8, 1e-6)
    compiled[0] = True


compiled = [False]  # set once `warm_up_kernels` has run in this process
