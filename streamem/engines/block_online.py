"""Block-online EM for a hidden Markov model: one stream, learned a block of records at a time.

Each block of `batch_size` records is smoothed by forward-backward, started from the filter at
the end of the block before it (so the chain is one sequence across blocks), and its statistics,
normalised per record, are blended into the running ones with the step `eta_t` of stepwise EM;
the parameters are the M-step of the running statistics (Le Corff & Fort 2013, "Online
expectation maximization based algorithms for inference in hidden Markov models").

Why blocks rather than Cappé's (2011) record-by-record recursion: a block's statistics are the
family's own statistics plus transition counts (`HMMStats`), which add and scale like every
other model's, so the same `summarize` / `apply` interface, checkpoints and statistics log carry
them; Cappé's auxiliary statistics are one copy of everything per current state (K times the
memory) and cannot be summed across workers. A block is also one vectorised pass (the
forward-backward kernel, one family E-step and one M-step) instead of a K x K x statistics
update per record. The price: the records near a block's end are smoothed with less future
than batch Baum-Welch would use, which the tests bound against batch Baum-Welch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from streamem.engines.baum_welch import HMMParams, m_step
from streamem.engines.markov_chain import ForwardBackward, forward_backward
from streamem.families.markov import HMMStats
from streamem.schedules import StepSize

__all__ = ["BlockOnlineEM", "block_statistics", "one_sequence"]

_RECENTRE_EVERY = 16
_BOUNDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # one sequence of n records: (starts, ends), by n


def one_sequence(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of a single sequence of `n` records (cached: blocks are mostly one size)."""
    bounds = _BOUNDS.get(n)
    if bounds is None:
        bounds = _BOUNDS[n] = (np.zeros(1, dtype=np.int64), np.array([n], dtype=np.int64))
        if len(_BOUNDS) > 64:
            _BOUNDS.clear()
            _BOUNDS[n] = bounds
    return bounds


def block_statistics(family, batch, params: HMMParams, previous_filter) -> tuple[ForwardBackward, HMMStats]:
    """Forward-backward over one block that continues a stream whose filter before it is
    `previous_filter` (K,) (None: the block starts the stream), and the block's statistics.

    The transition into the block's first record is counted too, so n records of a stream in
    blocks count n - 1 transitions, as one pass of Baum-Welch over the whole stream would.
    """
    chain = params.chain
    n = batch.n_samples
    if previous_filter is None:
        predicted = chain.startprob
    else:
        predicted = previous_filter @ chain.transmat
    log_b = family.log_prob(batch, params.emissions)
    result = forward_backward(log_b, predicted, chain.transmat, *one_sequence(n))
    transitions, first = result.transitions, result.first
    if previous_filter is not None:
        # P(z_0 = i, z_1 = j | ...) = filter_0(i) A_ij P(z_1 = j | ...) / P(z_1 = j | filter_0)
        ratio = np.divide(result.posterior[0], predicted, out=np.zeros_like(predicted), where=predicted > 0)
        transitions = transitions + previous_filter[:, None] * chain.transmat * ratio[None, :]
        first = np.zeros_like(first)
    emissions = family.suff_stats(batch, result.posterior)
    return result, HMMStats(first, transitions, emissions)


@dataclasses.dataclass
class BlockOnlineEM:
    """Running state of block-online EM: `stats` normalised per record, `params` their M-step,
    `n_updates` blocks blended so far (the warm-up counts as warmup / batch_size of them)."""

    family: object
    stats: HMMStats
    params: HMMParams
    n_updates: float
    schedule: StepSize
    keep_states: Callable

    def apply(self, block: HMMStats) -> None:
        """Blend a block's statistics (sums over its records) in and run the M-step."""
        stats = self.stats.blend(block, self.schedule(self.n_updates), 1.0 / block.count)
        self.params = m_step(self.family, stats, self.params, self.keep_states)
        self.n_updates += 1
        if self.n_updates % _RECENTRE_EVERY < 1:
            # moments about the data's current mean keep full precision on a stream that moves far
            # from where it started (exact algebra; every few blocks is enough: a block moves little)
            stats = HMMStats(stats.first, stats.transitions, stats.emissions.recentred(stats.emissions.data_mean()))
        self.stats = stats
