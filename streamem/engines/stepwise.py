"""Stepwise (online) EM: blend each mini-batch's statistics into running ones, then m-step.

For mini-batch number t with statistics `s_batch` (normalised per record):
`s = (1 - eta_t) * s + eta_t * s_batch`, and the parameters are the m-step of `s`.
The running statistics are kept about a shift that follows the data (re-centred
after every update, which is exact algebra), so a stream around 1e6 with unit
spread keeps full precision.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from streamem.families.base import MASS_FLOOR
from streamem.schedules import StepSize

__all__ = ["StepwiseEM"]

# A component whose mass falls below this (statistics normalised per record, so
# masses sum to 1) is "dead". Rule: it is kept, not re-seeded: its mass is held at
# this floor with its mean and covariance frozen (the ratio of its statistics),
# so it stays finite and can come back if records arrive for it again.
DEAD_MASS = 1e-8


@dataclasses.dataclass
class StepwiseEM:
    """Running state of stepwise EM for one family.

    Attributes
    ----------
    family
        The model family (Gaussian or regression).
    stats
        Running sufficient statistics, normalised per record.
    params
        m-step of `stats` (what the model predicts with).
    n_updates
        t, the number of mini-batches blended so far (the warm-up counts as
        `warmup / batch_size` of them, so alpha = 1 gives an exact running mean).
    schedule
        The step-size schedule.
    averaging_start
        With Polyak-Ruppert averaging, the update number from which parameters are
        averaged (None: no averaging).
    """

    family: object
    stats: object
    params: object
    n_updates: float
    schedule: StepSize
    averaging_start: float | None = None
    averaged: object | None = None
    n_averaged: int = 0

    def update(self, batch, log_prob: np.ndarray | None = None) -> np.ndarray:
        """Blend one prepared mini-batch in; return its records' log-likelihoods before the update.

        `log_prob`: the batch's component log-densities under `params`, when the caller (the
        outlier screen) has computed them already; they are not computed again."""
        if log_prob is not None:
            log_norm, _, batch_stats = self.family.expected_stats(batch, self.params, log_prob=log_prob)
        else:
            log_norm, _, batch_stats = self.family.expected_stats(batch, self.params)
        self.apply(batch_stats, 1.0 / batch.n_samples)
        return log_norm

    def apply(self, batch_stats, batch_scale: float = 1.0) -> None:
        """Blend in one mini-batch's per-record statistics (computed here, or by another replica);
        `batch_scale` makes per-record statistics of sums on the way."""
        step = self.schedule(self.n_updates)
        # a family may do the whole update in one fused pass (the Gaussian family, full covariances: the
        # per-update cost of a small model is NumPy's call overhead, not arithmetic); None: not here
        fused = getattr(self.family, "blend_and_m_step", None)
        updated = None if fused is None else fused(self.stats, batch_stats, step, batch_scale, DEAD_MASS)
        if updated is not None:
            self.stats, self.params = updated
            self.n_updates += 1
        else:
            stats = _hold_dead_components(self.stats.blend(batch_stats, step, batch_scale))
            self.stats = stats.recentred(stats.data_mean())
            self.n_updates += 1
            self.params = self.family.m_step(self.stats)
        if self.averaging_start is not None and self.n_updates >= self.averaging_start:
            self._average()

    def apply_answered(
        self, rows: np.ndarray, resp: np.ndarray, size: int, min_count: float, head: int = 0, pooled=None
    ) -> int:
        """`apply` of the statistics of the whole mini-batches of `size` answered rows (the rows as given,
        not centred: each mini-batch is centred on the running shift there, and their responsibilities),
        one after the other, in one fused call where the family has one (the Gaussian family, full
        covariances; not with averaging); returns the rows learned (0: none, the caller learns them one
        mini-batch at a time). With `head` > 0 the first mini-batch is the first `head` rows with the
        statistics `pooled` before them (`apply` of `pooled` + theirs), then whole mini-batches follow."""
        fused = getattr(self.family, "learn_answered", None)
        n_batches = (1 + (rows.shape[0] - head) // size) if head else rows.shape[0] // size
        if fused is None or self.averaging_start is not None or not n_batches or head > rows.shape[0]:
            return 0
        steps, t = [], self.n_updates
        for _ in range(n_batches):  # the schedule as `apply` would meet it, update after update
            steps.append(self.schedule(t))
            t += 1
        keeps = [1.0 - step for step in steps]
        learned = fused(self.stats, rows, resp, size, keeps, steps, min_count, DEAD_MASS, head, pooled)
        if learned is None:
            return 0
        done, self.stats, self.params = learned
        for _ in range(done):  # one at a time, as `apply` counts them (the count can be fractional)
            self.n_updates += 1
        return head + (done - 1) * size if head else done * size

    @property
    def predictive_params(self):
        """Averaged parameters once averaging has started, else the current ones."""
        return self.averaged if self.averaged is not None else self.params

    def _average(self) -> None:
        self.n_averaged += 1
        if self.averaged is None:
            self.averaged = self.params
            return
        fraction = 1.0 / self.n_averaged
        fields = self.family.param_fields
        blended = [
            getattr(self.averaged, name) + fraction * (getattr(self.params, name) - getattr(self.averaged, name))
            for name in fields
        ]
        self.averaged = self.family.make_params(*blended)


def _hold_dead_components(stats):
    """Scale a dead component's statistics back up to `DEAD_MASS` (its mean/covariance unchanged)."""
    mass = stats.mass
    if min(mass.tolist()) >= DEAD_MASS:  # the usual case, in Python: K floats beat two NumPy calls
        return stats
    dead = mass < DEAD_MASS
    if not dead.any():
        return stats
    factor = np.where(dead, DEAD_MASS / np.maximum(mass, MASS_FLOOR), 1.0)
    rescaled = {}
    for field in stats._additive_fields():
        value = getattr(stats, field)
        rescaled[field] = value * factor.reshape((-1,) + (1,) * (value.ndim - 1))
    return dataclasses.replace(stats, **rescaled)
