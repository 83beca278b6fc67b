"""Inference on a hidden Markov chain: filter, forward-backward and Viterbi, compiled with numba.

Every function takes the per-record log-densities of each state, ``log_b`` (T, K), which the
model families compute (`family.log_prob`), so the chain knows nothing about emissions. Several
sequences share one array; ``starts`` / ``ends`` (from `sequence_bounds`) say where each one is.

Why compiled: the recursions run over time, one record after the other, and cannot be written as
whole-array NumPy. In a Python loop they cost ~5 us a record (T = 100k, K = 4: 0.5 s a pass);
numba runs them at ~20-40 ns a record, and hmmlearn (the reference) is compiled C++ too.

Why scaled rather than log space: the forward pass is normalised at every record (Rabiner 1989),
and each record's densities are taken relative to their largest one, so nothing underflows
however long the sequence (T = 10^6 included) and no logarithm is taken inside the K x K
products. A record that every state reachable from the filter finds far less likely than some
unreachable state (possible only with zeros in the transition matrix) would underflow that
scale; that record is rescaled in log space instead.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["sequence_bounds", "filter_states", "forward_backward", "viterbi", "ForwardBackward"]

# Below this the normaliser of a record has lost precision: that record is rescaled in log space.
_SMALLEST_NORMALISER = 1e-250
# exp() of more than this overflows; only a state the filter gives < e^-700 can need more.
_LARGEST_EXPONENT = 700.0


def sequence_bounds(lengths, n_records: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the sequences that `lengths` cuts `n_records` records into.

    `lengths=None` is one sequence. ValueError unless the lengths are positive integers summing
    to `n_records` (hmmlearn's `lengths`).
    """
    if lengths is None:
        lengths = [n_records]
    values = np.asarray(lengths)
    if values.ndim != 1 or values.size == 0 or values.dtype.kind not in "iu":
        raise ValueError(f"lengths must be a non-empty list of integers, got {lengths!r}")
    if np.any(values <= 0):
        raise ValueError(f"lengths must all be positive, got {values.tolist()}")
    if int(values.sum()) != n_records:
        raise ValueError(f"lengths sum to {int(values.sum())}, but X has {n_records} records")
    ends = np.cumsum(values).astype(np.int64)
    return ends - values.astype(np.int64), ends


@numba.njit(cache=True, nogil=True)
def _forward(log_b, startprob, transmat, starts, ends, alpha, scaled_b, normaliser, log_scale):  # pragma: no cover
    # alpha[t] = P(z_t | x_1..t); scaled_b[t] = p(x_t | z_t) / exp(shift_t);
    # normaliser[t] = p(x_t | x_1..t-1) / exp(shift_t); log_scale[t] = log p(x_t | x_1..t-1)
    n_states = log_b.shape[1]
    predicted = np.empty(n_states)
    for s in range(starts.shape[0]):
        for t in range(starts[s], ends[s]):
            if t == starts[s]:
                for j in range(n_states):
                    predicted[j] = startprob[j]
            else:
                for j in range(n_states):
                    total = 0.0
                    for i in range(n_states):
                        total += alpha[t - 1, i] * transmat[i, j]
                    predicted[j] = total
            shift = log_b[t, 0]
            for j in range(1, n_states):
                shift = max(shift, log_b[t, j])
            total = 0.0
            for j in range(n_states):
                scaled_b[t, j] = math.exp(log_b[t, j] - shift)
                alpha[t, j] = predicted[j] * scaled_b[t, j]
                total += alpha[t, j]
            if not total > _SMALLEST_NORMALISER:
                # the likely states are unreachable: shift by the best reachable one instead
                shift = -np.inf
                for j in range(n_states):
                    if predicted[j] > 0.0:
                        shift = max(shift, math.log(predicted[j]) + log_b[t, j])
                total = 0.0
                for j in range(n_states):
                    scaled_b[t, j] = math.exp(min(log_b[t, j] - shift, _LARGEST_EXPONENT))
                    alpha[t, j] = predicted[j] * scaled_b[t, j]
                    total += alpha[t, j]
            for j in range(n_states):
                alpha[t, j] /= total
            normaliser[t] = total
            log_scale[t] = math.log(total) + shift


@numba.njit(cache=True, nogil=True)
def _backward(alpha, scaled_b, normaliser, transmat, starts, ends, posterior, transitions, first):  # pragma: no cover
    # beta[t] = p(x_t+1..T | z_t) / p(x_t+1..T | x_1..t), kept one record at a time;
    # posterior[t] = alpha[t] * beta[t]; transitions += sum_t P(z_t = i, z_t+1 = j | x)
    n_states = alpha.shape[1]
    beta = np.empty(n_states)
    weighted = np.empty(n_states)
    for s in range(starts.shape[0]):
        last = ends[s] - 1
        for j in range(n_states):
            beta[j] = 1.0
        for t in range(last - 1, starts[s] - 1, -1):
            for j in range(n_states):
                weighted[j] = scaled_b[t + 1, j] * beta[j] / normaliser[t + 1]
                # written only now: `posterior` may be `scaled_b`'s memory, and row t + 1 was just read
                posterior[t + 1, j] = alpha[t + 1, j] * beta[j]
            for i in range(n_states):
                total = 0.0
                for j in range(n_states):
                    pair = transmat[i, j] * weighted[j]
                    transitions[i, j] += alpha[t, i] * pair
                    total += pair
                # a state the filter rules out has no posterior whatever its beta; kept at 0, its beta
                # cannot grow by 1 / normaliser a record into inf (and 0 * inf = NaN) through a long impossible run
                beta[i] = total if alpha[t, i] > 0.0 else 0.0
        for j in range(n_states):
            posterior[starts[s], j] = alpha[starts[s], j] * beta[j]
            first[j] += posterior[starts[s], j]


@numba.njit(cache=True, nogil=True)
def _viterbi(log_b, log_startprob, log_transmat, starts, ends, path):  # pragma: no cover
    n_states = log_b.shape[1]
    best = np.empty(n_states)
    previous = np.empty(n_states)
    back = np.empty(log_b.shape, dtype=np.int64)
    total = 0.0
    for s in range(starts.shape[0]):
        for j in range(n_states):
            best[j] = log_startprob[j] + log_b[starts[s], j]
        for t in range(starts[s] + 1, ends[s]):
            for j in range(n_states):
                previous[j] = best[j]
            for j in range(n_states):
                top = previous[0] + log_transmat[0, j]
                arg = 0
                for i in range(1, n_states):
                    candidate = previous[i] + log_transmat[i, j]
                    if candidate > top:
                        top = candidate
                        arg = i
                best[j] = top + log_b[t, j]
                back[t, j] = arg
        state = 0
        for j in range(1, n_states):
            if best[j] > best[state]:
                state = j
        total += best[state]
        path[ends[s] - 1] = state
        for t in range(ends[s] - 1, starts[s], -1):
            state = back[t, state]
            path[t - 1] = state
    return total


class ForwardBackward:
    """What forward-backward says about records: `posterior` (T, K) P(z_t | all records of its
    sequence), `filtered` (T, K) P(z_t | records up to t), `log_likelihood` (T,) log p(x_t | x_1..t-1)
    (their sum is the sequences' log-likelihood), `first` (K,) the expected number of sequences
    starting in each state, `transitions` (K, K) the expected number of i -> j transitions."""

    __slots__ = ("posterior", "filtered", "log_likelihood", "first", "transitions")

    def __init__(self, posterior, filtered, log_likelihood, first, transitions):
        self.posterior = posterior
        self.filtered = filtered
        self.log_likelihood = log_likelihood
        self.first = first
        self.transitions = transitions


def _checked_inputs(log_b, startprob, transmat):
    log_b = np.ascontiguousarray(log_b, dtype=np.float64)
    return log_b, np.ascontiguousarray(startprob, dtype=np.float64), np.ascontiguousarray(transmat, dtype=np.float64)


def filter_states(log_b, startprob, transmat, starts, ends) -> tuple[np.ndarray, np.ndarray]:
    """Forward pass only: (filtered (T, K), log_likelihood (T,)), as in `ForwardBackward`."""
    log_b, startprob, transmat = _checked_inputs(log_b, startprob, transmat)
    T, K = log_b.shape
    alpha, scaled_b = np.empty((T, K)), np.empty((T, K))
    normaliser, log_scale = np.empty(T), np.empty(T)
    _forward(log_b, startprob, transmat, starts, ends, alpha, scaled_b, normaliser, log_scale)
    return alpha, log_scale


def forward_backward(log_b, startprob, transmat, starts, ends) -> ForwardBackward:
    """Posteriors, filtered probabilities, log-likelihoods and expected transition counts."""
    log_b, startprob, transmat = _checked_inputs(log_b, startprob, transmat)
    T, K = log_b.shape
    alpha, scaled_b = np.empty((T, K)), np.empty((T, K))
    normaliser, log_scale = np.empty(T), np.empty(T)
    _forward(log_b, startprob, transmat, starts, ends, alpha, scaled_b, normaliser, log_scale)
    posterior = scaled_b  # each record's scaled densities are read before its posterior is written
    transitions, first = np.zeros((K, K)), np.zeros(K)
    _backward(alpha, scaled_b, normaliser, transmat, starts, ends, posterior, transitions, first)
    return ForwardBackward(posterior, alpha, log_scale, first, transitions)


def viterbi(log_b, startprob, transmat, starts, ends) -> tuple[np.ndarray, float]:
    """The most likely state path (T,) and its joint log-probability with the records."""
    log_b, startprob, transmat = _checked_inputs(log_b, startprob, transmat)
    with np.errstate(divide="ignore"):  # a zero probability is log 0 = -inf: that move never wins
        log_startprob, log_transmat = np.log(startprob), np.log(transmat)
    path = np.empty(log_b.shape[0], dtype=np.int64)
    total = _viterbi(log_b, log_startprob, log_transmat, starts, ends, path)
    return path, float(total)
