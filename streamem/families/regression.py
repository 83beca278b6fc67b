"""Mixture of linear regressions: y | z=k ~ N(b_k . [x, 1], s_k^2).

The statistics are the weighted normal equations of each component, kept about a
shift of (x, y): `xx = sum r x~ x~^T`, `xy = sum r x~ y~`, `yy = sum r y~^2` with
`x~ = [x - shift_x, 1]` and `y~ = y - shift_y`. The M-step is one weighted
least-squares solve per component, batched.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from streamem.families.base import MASS_FLOOR, SufficientStatistics, log_responsibilities, responsibilities

__all__ = ["RegressionBatch", "RegressionFamily", "RegressionParams", "RegressionStats"]

_LOG_2PI = math.log(2.0 * math.pi)
# Relative ridge on the normal equations: invisible on well-posed data, but keeps the
# solve finite for d > n or for a component that received (almost) no mass.
_RIDGE = 1e-10


@dataclasses.dataclass(frozen=True)
class RegressionBatch:
    """design: (n, d + 1) = [x - shift_x, 1]; target: (n,) = y - shift_y; shift = [shift_x, shift_y]."""

    design: np.ndarray
    target: np.ndarray
    shift: np.ndarray

    @property
    def n_samples(self) -> int:
        return self.design.shape[0]

    def __getitem__(self, rows: slice) -> RegressionBatch:
        return RegressionBatch(self.design[rows], self.target[rows], self.shift)


@dataclasses.dataclass(frozen=True)
class RegressionStats(SufficientStatistics):
    """mass (K,), xx (K, d+1, d+1), xy (K, d+1), yy (K,) about `shift` (d + 1,)."""

    mass: np.ndarray
    xx: np.ndarray
    xy: np.ndarray
    yy: np.ndarray

    def data_mean(self) -> np.ndarray:
        """Mean of the (x, y) records summarised (the natural shift), shape (d + 1,)."""
        total = max(self.mass.sum(), MASS_FLOOR)
        d = self.xy.shape[1] - 1
        mean_x = self.shift[:d] + self.xx[:, :d, d].sum(axis=0) / total
        mean_y = self.shift[d] + self.xy[:, d].sum() / total
        return np.append(mean_x, mean_y)

    def check_moments(self) -> None:
        from streamem.state import check_moment_matrices

        K, p = self.xy.shape
        moments = np.empty((K, p + 1, p + 1))
        moments[:, :p, :p] = self.xx
        moments[:, :p, p] = moments[:, p, :p] = self.xy
        moments[:, p, p] = self.yy
        check_moment_matrices(moments, "'stats' (xx, xy, yy together)")

    @classmethod
    def field_shapes(cls, n_components: int, width: int, document: dict | None = None) -> dict[str, tuple[int, ...]]:
        """`width` is d + 1: the features, then the target (the shift covers both)."""
        K, p = n_components, width
        return {"shift": (p,), "mass": (K,), "xx": (K, p, p), "xy": (K, p), "yy": (K,)}

    def widened(self, old_d: int, added: int) -> RegressionStats:
        """The statistics with `added` features inserted before the intercept column, reading 0 in every
        record summarised so far (River's convention for a feature that appears mid-stream)."""
        K, p = self.mass.shape[0], old_d + 1
        order = list(range(old_d)) + [old_d + added]  # where the old columns land
        new_p = p + added
        xx = np.zeros((K, new_p, new_p))
        xx[np.ix_(range(K), order, order)] = self.xx
        xy = np.zeros((K, new_p))
        xy[:, order] = self.xy
        shift = np.zeros(new_p)
        shift[order] = self.shift
        return RegressionStats(shift=shift, mass=self.mass, xx=xx, xy=xy, yy=self.yy)

    def recentred(self, shift: np.ndarray) -> RegressionStats:
        shift = np.asarray(shift, dtype=float)
        delta = self.shift - shift
        d = delta.shape[0] - 1
        # x~_new = A x~_old with A = [[I, delta_x], [0, 1]]; y~_new = y~_old + delta_y
        A = np.eye(d + 1)
        A[:d, d] = delta[:d]
        delta_y = delta[d]
        sum_design = self.xx[:, :, d]  # sum r x~ (the column of ones)
        sum_target = self.xy[:, d]  # sum r y~
        xx = A @ self.xx @ A.T
        xy = (self.xy + delta_y * sum_design) @ A.T
        yy = self.yy + 2.0 * delta_y * sum_target + delta_y**2 * self.mass
        return RegressionStats(shift=shift, mass=self.mass.copy(), xx=xx, xy=xy, yy=yy)


@dataclasses.dataclass(frozen=True)
class RegressionParams:
    weights: np.ndarray  # (K,)
    coef: np.ndarray  # (K, d)
    intercept: np.ndarray  # (K,)
    noise_variance: np.ndarray  # (K,)

    @property
    def n_components(self) -> int:
        return self.coef.shape[0]

    @property
    def n_features(self) -> int:
        return self.coef.shape[1]


class RegressionFamily:
    """Mixture-of-linear-regressions family.

    Parameters
    ----------
    reg_noise
        Added to every component's noise variance after each M-step (the analogue
        of `reg_covar`): a component that fits its points exactly stays finite.
    shared_variance
        One noise variance for all components (the M-step pools their residual sums of
        squares), as a Markov-switching regression with `switching_variance=False`.
    """

    covariance_type = "regression"
    param_fields = ("weights", "coef", "intercept", "noise_variance")

    def __init__(self, reg_noise: float = 1e-6, shared_variance: bool = False):
        self.reg_noise = float(reg_noise)
        self.shared_variance = bool(shared_variance)

    @staticmethod
    def prepare(X: np.ndarray, y: np.ndarray, shift: np.ndarray | None = None) -> RegressionBatch:
        if shift is None:
            shift = np.append(X.mean(axis=0), y.mean())
        shift = np.asarray(shift, dtype=float)
        d = X.shape[1]
        design = np.empty((X.shape[0], d + 1))
        design[:, :d] = X - shift[:d]
        design[:, d] = 1.0
        return RegressionBatch(design=design, target=y - shift[d], shift=shift)

    def make_params(self, weights, coef, intercept, noise_variance) -> RegressionParams:
        params = RegressionParams(
            np.asarray(weights, dtype=float),
            np.atleast_2d(np.asarray(coef, dtype=float)),
            np.asarray(intercept, dtype=float).reshape(-1),
            np.asarray(noise_variance, dtype=float).reshape(-1),
        )
        K = params.coef.shape[0]
        for name in ("weights", "intercept", "noise_variance"):
            value = getattr(params, name)
            if value.shape != (K,) or not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must be {K} finite values, got {value}")
        if np.any(params.noise_variance <= 0) or np.any(params.weights < 0):
            raise ValueError("noise variances must be > 0 and weights >= 0")
        return params

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Coefficients and intercept, noise variance (one if shared), and K - 1 free weights."""
        n_variances = 1 if self.shared_variance else n_components
        return n_components * (n_features + 1) + n_variances + n_components - 1

    def predict_components(self, batch: RegressionBatch, params: RegressionParams) -> np.ndarray:
        """Each component's mean of y~ (centred target) for every record, shape (n, K)."""
        d = params.n_features
        shift_x, shift_y = batch.shift[:d], batch.shift[d]
        offsets = params.intercept + params.coef @ shift_x - shift_y
        return batch.design[:, :d] @ params.coef.T + offsets

    def log_prob(self, batch: RegressionBatch, params: RegressionParams) -> np.ndarray:
        """log N(y | b_k . [x, 1], s_k^2) for every record and component, shape (n, K)."""
        residual = batch.target[:, None] - self.predict_components(batch, params)
        variance = params.noise_variance
        return -0.5 * (_LOG_2PI + np.log(variance) + residual**2 / variance)

    def weighted_log_prob(self, batch: RegressionBatch, params: RegressionParams) -> np.ndarray:
        """log w_k + log N(y | b_k . [x, 1], s_k^2), shape (n, K)."""
        with np.errstate(divide="ignore"):  # a weight of exactly 0 is log 0 = -inf, by design
            log_weights = np.log(params.weights)
        return self.log_prob(batch, params) + log_weights

    def e_step(self, batch: RegressionBatch, params: RegressionParams) -> tuple[np.ndarray, np.ndarray]:
        """Per-record log-likelihood (n,) and log responsibilities (n, K)."""
        return log_responsibilities(self.weighted_log_prob(batch, params))

    def expected_stats(self, batch: RegressionBatch, params: RegressionParams):
        """E-step and expected statistics in one: (log-likelihood (n,), responsibilities (n, K), stats)."""
        log_norm, resp = responsibilities(self.weighted_log_prob(batch, params))
        return log_norm, resp, self.suff_stats(batch, resp)

    def suff_stats(self, batch: RegressionBatch, resp: np.ndarray) -> RegressionStats:
        design, target = batch.design, batch.target
        n, p = design.shape
        outer = (design[:, :, None] * design[:, None, :]).reshape(n, p * p)
        return RegressionStats(
            shift=batch.shift,
            mass=resp.sum(axis=0),
            xx=(resp.T @ outer).reshape(-1, p, p),
            xy=resp.T @ (design * target[:, None]),
            yy=resp.T @ (target * target),
        )

    def m_step(self, stats: RegressionStats) -> RegressionParams:
        """Weighted least squares per component from the normal equations."""
        mass = stats.mass + MASS_FLOOR
        p = stats.xx.shape[1]
        d = p - 1
        scale = np.trace(stats.xx, axis1=1, axis2=2) / p
        ridge = (_RIDGE * scale + MASS_FLOOR)[:, None, None] * np.eye(p)
        beta = np.linalg.solve(stats.xx + ridge, stats.xy[:, :, None])[:, :, 0]
        # residual sum of squares for this beta: yy - 2 b.xy + b' xx b (exact for any b)
        rss = stats.yy - 2.0 * np.einsum("kp,kp->k", beta, stats.xy) + np.einsum("kp,kpq,kq->k", beta, stats.xx, beta)
        rss = np.maximum(rss, 0.0)
        if self.shared_variance:  # the ML variance of one noise for all: every residual over every record
            noise_variance = np.full_like(rss, rss.sum() / mass.sum() + self.reg_noise)
        else:
            noise_variance = rss / mass + self.reg_noise
        coef = beta[:, :d]
        intercept = beta[:, d] + stats.shift[d] - coef @ stats.shift[:d]
        return RegressionParams(mass / mass.sum(), coef, intercept, noise_variance)
