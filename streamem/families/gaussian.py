"""Gaussian mixture family: log responsibilities, sufficient statistics and M-step.

Four covariance types share one code path, picked by `covariance_type` as in
scikit-learn: ``full`` (K, d, d), ``tied`` (d, d), ``diag`` (K, d), ``spherical`` (K,).

Why it is fast: the E-step computes every component's whitened residuals with a
single matrix product ``[P_1 ... P_K]^T X^T`` (P_k the precision Cholesky factors),
and the statistics of every component come from two more products,
``resp.T @ X`` and ``resp.T @ (X outer X)``. There is no Python loop over
components on the per-record path. Log-densities are laid out component by
component, (K, n) (handed out as its (n, K) transpose), so that the reductions over
components (the log-sum-exp) run along contiguous rows. Diagonal and spherical
covariances are an affine form in ``[x^2, x, 1]``: with that design cached (batch
EM), a chunk's E-step and a batch's statistics are one product each. The M-step gets
the factors P_k from one Cholesky factorisation per component (of ``[[S, I], [I, cI]]``,
whose lower-left block is P_k), not a Cholesky and an inverse.

Why it stays accurate: every batch is centred on a shift before any moment is
taken, so data around 1e6 with unit spread keeps its digits.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from streamem.families import gaussian_kernels as kernels
from streamem.families.base import MASS_FLOOR, SufficientStatistics, log_responsibilities, responsibilities
from streamem.families.gaussian_linalg import (
    LOG_2PI,
    component_covariance,
    full_covariances,
    unpack_symmetric,
    upper_triangle,
)
from streamem.families.gaussian_missing import missing_e_step

__all__ = [
    "COVARIANCE_TYPES",
    "GaussianBatch",
    "GaussianFamily",
    "GaussianParams",
    "GaussianStats",
    "full_covariances",
    "unpack_symmetric",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


@functools.lru_cache(maxsize=64)
def _minus_halves(d: int) -> np.ndarray:
    """(d,) of -1/2: a product with it sums groups of d squares and halves them in one call
    (a matrix-vector product beats .sum(axis=2); read-only, cached)."""
    halves = np.full(d, -0.5)
    halves.flags.writeable = False
    return halves


@functools.lru_cache(maxsize=64)
def _upper_positions(d: int) -> np.ndarray:
    """Flat positions (i d + j) of a d x d upper triangle, row by row (read-only, cached)."""
    rows, cols = upper_triangle(d)
    positions = rows * d + cols
    positions.flags.writeable = False
    return positions


@functools.lru_cache(maxsize=64)
def _diagonal_positions(d: int) -> np.ndarray:
    """Positions of the diagonal entries in a packed upper triangle (read-only, cached)."""
    rows, cols = upper_triangle(d)
    positions = np.flatnonzero(rows == cols)
    positions.flags.writeable = False
    return positions


@dataclasses.dataclass(frozen=True)
class GaussianBatch:
    """Records centred on a shift: `centred = X - shift`, shape (n_samples, n_features).

    `squares` optionally caches the products the second moments need: for full and
    tied covariances the upper triangle of each record's outer product, packed as
    (n, d (d + 1) / 2); for diag and spherical the squares (n, d). Batch EM computes
    them once per fit instead of once per iteration. For diag and spherical, `design`
    then holds [squares, centred, 1] (n, 2 d + 1) (`squares` is a view of it): the
    E-step and all the statistics of a chunk are one matrix product with it each.
    """

    centred: np.ndarray
    shift: np.ndarray
    squares: np.ndarray | None = None
    has_missing: bool = False  # NaN marks a missing feature (marginalised in the E-step)
    design: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return self.centred.shape[0]

    def __getitem__(self, rows: slice) -> GaussianBatch:
        squares = None if self.squares is None else self.squares[rows]
        design = None if self.design is None else self.design[rows]
        return GaussianBatch(self.centred[rows], self.shift, squares, self.has_missing, design)


@dataclasses.dataclass(frozen=True)
class GaussianStats(SufficientStatistics):
    """Responsibility-weighted moments about `shift`.

    mass: (K,) sum of responsibilities; first: (K, d) sum r (x - shift);
    second: sum r (x - shift)(x - shift)^T, for full/tied as its upper triangle
    packed row by row, (K, d (d + 1) / 2), for diag/spherical as its diagonal (K, d).
    Packing halves the work and the checkpoint size; `unpack_symmetric` restores it.
    """

    mass: np.ndarray
    first: np.ndarray
    second: np.ndarray

    def data_mean(self) -> np.ndarray:
        """Mean of the records summarised (the natural shift), shape (d,)."""
        # ufunc reductions: .sum() goes through a Python wrapper first (per update, this is the hot path)
        return self.shift + np.add.reduce(self.first, axis=0) / max(float(np.add.reduce(self.mass)), MASS_FLOOR)

    def check_moments(self) -> None:
        from streamem.state import StateError, check_moment_matrices

        K, d = self.first.shape
        if self.second.shape[1] == d:  # diagonal moments (or d = 1): mass * second_j >= first_j^2
            scale = 1e-9 * np.maximum(1.0, np.abs(self.mass[:, None] * self.second))
            bad = np.argwhere(self.mass[:, None] * self.second - self.first**2 < -scale)
            if bad.size:
                k, j = bad[0]
                raise StateError(
                    f"statistics of component {k}: mass x second moment < first moment^2 (feature {j}): no records "
                    "have such moments"
                )
            return
        moments = np.empty((K, d + 1, d + 1))
        moments[:, 0, 0] = self.mass
        moments[:, 0, 1:] = moments[:, 1:, 0] = self.first
        moments[:, 1:, 1:] = unpack_symmetric(self.second, d)
        check_moment_matrices(moments, "'stats' (mass, first, second together)")

    @classmethod
    def field_shapes(cls, n_components: int, width: int, document: dict | None = None) -> dict[str, tuple[int, ...]]:
        """`second` is packed upper triangles (full, tied) or diagonals (diag, spherical): the
        document's own layout is taken when it is one of the two."""
        K, d = n_components, width
        packed = (K, d * (d + 1) // 2)
        second = (K, d) if document is None or np.shape(document.get("second")) != packed else packed
        return {"shift": (d,), "mass": (K,), "first": (K, d), "second": second}

    def recentred(self, shift: np.ndarray) -> GaussianStats:
        shift = np.array(shift, dtype=float)
        delta = self.shift - shift  # x - new = (x - old) + delta
        first = self.mass[:, None] * delta
        first += self.first  # f' = f + m delta
        d = delta.shape[0]
        if self.second.shape[1] == d:  # diagonal moments: u^2 + (2 u + m delta) delta = u^2 + (f + f') delta
            second = self.first + first
            second *= delta
            second += self.second
        else:
            # packed upper triangles: u_i u_j + u_i delta_j + delta_i u_j + m delta_i delta_j, and the last
            # three are f'_i delta_j + delta_i f_j: two outer products, one gather of the triangle
            K = first.shape[0]
            outer = first[:, :, None] * delta
            outer += delta[:, None] * self.first[:, None, :]
            second = outer.reshape(K, d * d)[:, _upper_positions(d)]
            second += self.second
        return GaussianStats(shift=shift, mass=self.mass.copy(), first=first, second=second)


@dataclasses.dataclass(frozen=True)
class GaussianParams:
    """Mixture parameters plus the Cholesky factors every E-step reuses."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str
    precisions_cholesky: np.ndarray
    log_det_precision: np.ndarray  # (K,): log det of each component's precision, halved

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_features(self) -> int:
        return self.means.shape[1]

    # Values derived from the parameters are cached beside the fields (a frozen dataclass has a
    # __dict__ all the same); functools.cached_property takes a lock on Python 3.11, 5-10 us a call.
    @property
    def log_weights(self) -> np.ndarray:
        """log w_k, (K,) (computed once per parameters)."""
        cached = self.__dict__.get("_log_weights")
        if cached is None:
            with np.errstate(divide="ignore"):  # a weight of exactly 0 is log 0 = -inf, by design
                cached = self.__dict__["_log_weights"] = np.log(self.weights)
        return cached

    @property
    def whitening(self) -> np.ndarray:
        """Full covariances: the precision Cholesky factors transposed and stacked, (K d, d), so that
        `whitening @ X.T` whitens X for every component at once (computed once per parameters;
        a view when the factors are the transposed inverses `make_params` keeps)."""
        cached = self.__dict__.get("_whitening")
        if cached is None:
            K, d = self.means.shape
            cached = np.ascontiguousarray(self.precisions_cholesky.transpose(0, 2, 1)).reshape(K * d, d)
            self.__dict__["_whitening"] = cached
        return cached

    def quadratic_form(self, shift: np.ndarray, weighted: bool = False) -> np.ndarray:
        """Diag / spherical: (K, 2 d + 1) A with log N(x | k) = A_k . [u^2, u, 1] for u = x - shift,
        the Mahalanobis expansion (`weighted`: log w_k + log N(x | k)); kept for the last shift
        asked (batch EM asks once per chunk)."""
        key = "_weighted_quadratic_form" if weighted else "_quadratic_form"
        cached = self.__dict__.get(key)
        if cached is not None and cached[0] is shift:
            return cached[1]
        if weighted:
            form = self.quadratic_form(shift).copy()
            form[:, -1] += self.log_weights
            self.__dict__[key] = (shift, form)
            return form
        K, d = self.means.shape
        means = self.means - shift
        precision = self.precisions_cholesky**2
        if self.covariance_type == "spherical":
            precision = np.broadcast_to(precision[:, None], (K, d))
        form = np.empty((K, 2 * d + 1))
        np.multiply(precision, -0.5, out=form[:, :d])
        np.multiply(means, precision, out=form[:, d : 2 * d])
        form[:, 2 * d] = self.log_det_precision - 0.5 * d * LOG_2PI - 0.5 * (means**2 * precision).sum(axis=1)
        self.__dict__["_quadratic_form"] = (shift, form)
        return form

    @property
    def precisions(self) -> np.ndarray:
        p = self.precisions_cholesky
        if self.covariance_type == "full":
            return p @ p.transpose(0, 2, 1)
        if self.covariance_type == "tied":
            return p @ p.T
        return p**2


class GaussianFamily:
    """Gaussian mixture family for one covariance type.

    Parameters
    ----------
    covariance_type
        ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
    reg_covar
        Added to the diagonal of every covariance after each M-step, keeping them
        positive definite (as scikit-learn's ``reg_covar``).
    """

    param_fields = ("weights", "means", "covariances")

    def __init__(self, covariance_type: str = "full", reg_covar: float = 1e-6):
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}")
        self.covariance_type = covariance_type
        self.reg_covar = float(reg_covar)

    # -- data ---------------------------------------------------------------------------
    def prepare(self, X: np.ndarray, shift: np.ndarray | None = None, *, cache_squares: bool = False) -> GaussianBatch:
        """Centre validated records (n, d) on `shift` (their mean when not given).

        With `cache_squares`, the products behind the second moments are computed
        now, once, for a batch that will be passed over many times.
        """
        has_missing = bool(np.logical_or.reduce(np.isnan(X), axis=None))
        if shift is None and has_missing:
            observed = ~np.isnan(X)
            counts = observed.sum(axis=0)  # a column with no observed value is centred at 0
            shift = np.where(observed, X, 0.0).sum(axis=0) / np.maximum(counts, 1)
        elif shift is None:
            shift = X.mean(axis=0)
        if type(shift) is not np.ndarray or shift.dtype != np.float64:
            # (not asarray on every call: it gives a kernel's arrays a new view, and the shift's identity
            # is what tells an update that the batch is about its statistics' shift)
            shift = np.asarray(shift, dtype=float)
        centred = X - shift
        if not cache_squares or has_missing:
            return GaussianBatch(centred=centred, shift=shift, has_missing=has_missing)
        if self.covariance_type in ("full", "tied"):
            return GaussianBatch(centred=centred, shift=shift, squares=self._squares(centred))
        n, d = centred.shape
        design = np.empty((n, 2 * d + 1))
        np.multiply(centred, centred, out=design[:, :d])
        design[:, d : 2 * d] = centred
        design[:, 2 * d] = 1.0
        return GaussianBatch(centred=centred, shift=shift, squares=design[:, :d], design=design)

    def _squares(self, centred: np.ndarray) -> np.ndarray:
        """(n, d (d + 1) / 2) products of each record's upper triangle (full, tied) or (n, d) squares."""
        if self.covariance_type in ("full", "tied"):
            return self._squares_by_feature(centred).T
        return centred * centred

    @staticmethod
    def _squares_by_feature(centred: np.ndarray) -> np.ndarray:
        """(d (d + 1) / 2, n) the upper-triangle products, one row per pair of features: gathered
        as rows of the transposed records (contiguous copies), 1.5-3x faster than gathering columns."""
        rows, cols = upper_triangle(centred.shape[1])
        by_feature = np.ascontiguousarray(centred.T)
        products = np.take(by_feature, rows, axis=0)
        products *= np.take(by_feature, cols, axis=0)
        return products

    # -- parameters ---------------------------------------------------------------------
    def make_params(self, weights, means, covariances, *, repair: bool = False) -> GaussianParams:
        """Parameters from weights (K,), means (K, d) and covariances of this type.

        Raises `ValueError` when a covariance is not symmetric positive definite,
        unless `repair` (used by the M-step) clamps its eigenvalues at `reg_covar`.
        """
        weights = np.asarray(weights, dtype=float)
        means = np.asarray(means, dtype=float)
        covariances = np.asarray(covariances, dtype=float)
        chol, log_det, covariances = _precision_cholesky(
            covariances, self.covariance_type, self.reg_covar if repair else None
        )
        if self.covariance_type == "spherical":
            log_det = means.shape[1] * log_det  # one factor per dimension
        # two reductions, not four: NaN fails both comparisons, so it is refused too
        if weights.shape != (means.shape[0],) or not (
            np.minimum.reduce(weights) >= 0.0 and np.maximum.reduce(weights) < np.inf
        ):
            raise ValueError(f"weights must be {means.shape[0]} finite values >= 0, got {weights}")
        return GaussianParams(weights, means, covariances, self.covariance_type, chol, log_det)

    def covariance_shape(self, n_components: int, n_features: int) -> tuple[int, ...]:
        return {
            "full": (n_components, n_features, n_features),
            "tied": (n_features, n_features),
            "diag": (n_components, n_features),
            "spherical": (n_components,),
        }[self.covariance_type]

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Free parameters, counted as scikit-learn does (for BIC / AIC)."""
        K, d = n_components, n_features
        covariance = {"full": K * d * (d + 1) / 2, "tied": d * (d + 1) / 2, "diag": K * d, "spherical": K}
        return int(covariance[self.covariance_type] + K * d + K - 1)

    # -- E-step -------------------------------------------------------------------------
    def log_prob(self, batch: GaussianBatch, params: GaussianParams) -> np.ndarray:
        """log N(x | mean_k, cov_k) for every record and component, shape (n, K).

        Computed component by component along rows, (K, n), and returned as its transpose (an
        F-ordered (n, K) array): the E-step's reductions over components (max, sum) then run over
        contiguous rows, 10-40x faster for small K than reducing each record's K values.
        """
        X = batch.centred
        means = params.means - batch.shift
        n, d = X.shape
        K = means.shape[0]
        chol = params.precisions_cholesky
        kind = params.covariance_type
        constant = params.log_det_precision - 0.5 * d * LOG_2PI
        if kind == "full" and _compiled(K, d):
            return kernels.full_log_prob(_contiguous(X), means, _contiguous(chol), _contiguous(constant)).T
        if kind == "full":
            # whitened residuals of every component from one product [P_1 ... P_K]^T X^T
            offsets = np.matmul(means[:, None, :], chol).reshape(K * d, 1)
            whitened = params.whitening @ X.T
            whitened -= offsets
            whitened *= whitened
            # summing each component's d rows (and halving) by one product beats .sum(axis=1)
            log_prob = _minus_halves(d) @ whitened.reshape(K, d, n)
            log_prob += constant[:, None]
            return log_prob.T
        if kind == "tied":
            whitened = (X @ chol)[:, None, :] - (means @ chol)[None, :, :]
            mahalanobis = np.einsum("nkd,nkd->nk", whitened, whitened)
            mahalanobis *= -0.5
            mahalanobis += constant
            return mahalanobis
        return self._quadratic_log_prob(batch, params, constant, weighted=False)

    @staticmethod
    def _quadratic_log_prob(batch: GaussianBatch, params: GaussianParams, constant: np.ndarray, weighted: bool):
        """Diag, spherical: -1/2 sum_j p_kj (x_j - m_kj)^2 + c_k (+ log w_k if `weighted`) is affine in
        [x^2, x, 1]: one product with the batch's design when it has one. (n, K), F-ordered."""
        X = batch.centred
        d = X.shape[1]
        affine = params.quadratic_form(batch.shift, weighted)  # (K, 2 d + 1), cached for the parameters
        if batch.design is not None:
            log_prob = affine @ batch.design.T
        else:
            log_prob = affine[:, :d] @ (X * X).T
            log_prob += affine[:, d : 2 * d] @ X.T
            log_prob += affine[:, 2 * d : 2 * d + 1]
        # the expansion can exceed c_k (a negative squared distance) by rounding
        ceiling = constant + params.log_weights if weighted else constant
        np.minimum(log_prob, ceiling[:, None], out=log_prob)
        return log_prob.T

    def weighted_log_prob(
        self, batch: GaussianBatch, params: GaussianParams, log_prob: np.ndarray | None = None
    ) -> np.ndarray:
        """log w_k + log N(x | mean_k, cov_k), shape (n, K); from `log_prob` (updated in place) if given."""
        if log_prob is None and params.covariance_type in ("diag", "spherical"):  # the weights in the product
            constant = params.log_det_precision - 0.5 * batch.centred.shape[1] * LOG_2PI
            return self._quadratic_log_prob(batch, params, constant, weighted=True)
        weighted = self.log_prob(batch, params) if log_prob is None else log_prob
        weighted += params.log_weights
        return weighted

    def e_step(self, batch: GaussianBatch, params: GaussianParams) -> tuple[np.ndarray, np.ndarray]:
        """Per-record log-likelihood (n,) and log responsibilities (n, K)."""
        if batch.has_missing:
            log_norm, resp, _ = self._marginal_expected_stats(batch, params)
            with np.errstate(divide="ignore"):
                return log_norm, np.log(resp)
        return log_responsibilities(self.weighted_log_prob(batch, params))

    def expected_stats(self, batch: GaussianBatch, params: GaussianParams, log_prob: np.ndarray | None = None):
        """E-step and expected statistics in one: (log-likelihood (n,), responsibilities (n, K), stats).

        Missing features (NaN) are marginalised exactly (see `gaussian_missing`). `log_prob`:
        `log_prob(batch, params)` if the caller has it already (it is overwritten).
        """
        if batch.has_missing:
            return self._marginal_expected_stats(batch, params)
        if params.covariance_type == "full" and batch.squares is None and _compiled(*params.means.shape):
            # one compiled pass: responsibilities (in place of the log-densities) and the moments
            if log_prob is None:
                log_prob = self.log_prob(batch, params)
            by_component = log_prob.T if log_prob.flags.f_contiguous else np.ascontiguousarray(log_prob.T)
            log_norm, mass, first, second = kernels.full_moments(
                by_component, _contiguous(params.log_weights), _contiguous(batch.centred)
            )
            return log_norm, by_component.T, GaussianStats(shift=batch.shift, mass=mass, first=first, second=second)
        log_norm, resp = responsibilities(self.weighted_log_prob(batch, params, log_prob))
        return log_norm, resp, self.suff_stats(batch, resp)

    def screened_stats(
        self, rows: np.ndarray, shift: np.ndarray, params: GaussianParams, threshold: float
    ) -> GaussianStats | None:
        """`expected_stats(prepare(rows, shift), params)[2]` unless a record's squared Mahalanobis distance
        to its closest component is beyond `threshold` (the outlier screen of the online models), in two
        compiled calls (the same numbers); None then, or where only the general path goes (covariances
        other than full, more than `kernels.MAX_WIDTH` components or features). Rows without NaN."""
        K, d = params.means.shape
        if params.covariance_type != "full" or not _compiled(K, d):
            return None
        centred, log_prob, far = kernels.screen_full(
            _contiguous(rows),
            _contiguous(shift),
            _contiguous(params.means),
            _contiguous(params.precisions_cholesky),
            _contiguous(params.log_det_precision),
            0.5 * d * LOG_2PI,
            float(threshold),
        )
        if far:
            return None
        _, mass, first, second = kernels.full_moments(log_prob, _contiguous(params.log_weights), centred)
        return GaussianStats(shift=shift, mass=mass, first=first, second=second)

    def _marginal_expected_stats(self, batch: GaussianBatch, params: GaussianParams):
        """`expected_stats` of a batch with missing features (`gaussian_missing.missing_e_step`),
        its full second moments packed as this covariance type keeps them."""
        log_norm, resp, mass, first, second = missing_e_step(batch.centred + batch.shift, batch.shift, params)
        if params.covariance_type in ("full", "tied"):
            rows, cols = upper_triangle(first.shape[1])
            packed = second[:, rows, cols]
        else:
            packed = np.diagonal(second, axis1=1, axis2=2).copy()
        stats = GaussianStats(shift=np.asarray(batch.shift, dtype=float), mass=mass, first=first, second=packed)
        return log_norm, resp, stats

    # -- statistics and M-step ----------------------------------------------------------
    def suff_stats(self, batch: GaussianBatch, resp: np.ndarray) -> GaussianStats:
        """Moments of a batch about its shift, weighted by responsibilities (n, K)."""
        X = batch.centred
        if batch.design is not None:  # [squares, centred, 1]: every moment from one product
            d = X.shape[1]
            moments = resp.T @ batch.design
            return GaussianStats(
                shift=batch.shift, mass=moments[:, 2 * d], first=moments[:, d : 2 * d], second=moments[:, :d]
            )
        mass = np.add.reduce(resp, axis=0)
        first = resp.T @ X
        if batch.squares is not None:
            second = resp.T @ batch.squares
        elif self.covariance_type in ("full", "tied"):
            second = resp.T @ self._squares_by_feature(X).T
        else:
            second = resp.T @ (X * X)
        return GaussianStats(shift=batch.shift, mass=mass, first=first, second=second)

    def m_step(self, stats: GaussianStats) -> GaussianParams:
        """Maximum-likelihood parameters from statistics, plus `reg_covar` on the diagonal."""
        if self.covariance_type == "full" and _compiled(*stats.first.shape):
            params = self._compiled_m_step(stats)
            if params is not None:
                return params
        return self._numpy_m_step(stats)

    def _compiled_m_step(self, stats: GaussianStats) -> GaussianParams | None:
        """Full covariances: the M-step as one compiled call (None: a covariance the NumPy path repairs or
        refuses, or a weight that is not a finite value >= 0)."""
        weights, means, cov, chol, log_det, ok = kernels.full_m_step(
            _contiguous(stats.shift),
            _contiguous(stats.mass),
            _contiguous(stats.first),
            _contiguous(stats.second),
            self.reg_covar,
        )
        return GaussianParams(weights, means, cov, "full", chol, log_det) if ok else None

    def blend_and_m_step(
        self, stats: GaussianStats, batch: GaussianStats, step_size: float, batch_scale: float, dead_mass: float
    ) -> tuple[GaussianStats, GaussianParams] | None:
        """One stepwise update of full-covariance statistics in one compiled call: `stats.blend(batch,
        step_size, batch_scale)`, a component under `dead_mass` held there, re-centred on the data mean, then
        the M-step; returns (statistics, parameters), or None where the caller takes the NumPy path (other
        covariance types, statistics about another shift, a covariance the M-step must repair)."""
        if self.covariance_type != "full" or not _compiled(*stats.first.shape):
            return None
        if batch.shift is not stats.shift and not np.array_equal(batch.shift, stats.shift):
            return None
        shift, mass, first, second, weights, means, cov, chol, log_det, logs, ok = kernels.update_full(
            _contiguous(stats.shift),
            _contiguous(stats.mass),
            _contiguous(stats.first),
            _contiguous(stats.second),
            _contiguous(batch.mass),
            _contiguous(batch.first),
            _contiguous(batch.second),
            float(1.0 - step_size),
            float(step_size * batch_scale),
            float(dead_mass),
            self.reg_covar,
        )
        if not ok:
            return None
        blended = GaussianStats(shift=shift, mass=mass, first=first, second=second)
        params = GaussianParams(weights, means, cov, "full", chol, log_det)
        params.__dict__["_log_weights"] = logs  # what the `log_weights` property computes (np.log), cached
        return blended, params

    def answered_stats(self, rows: np.ndarray, shift: np.ndarray | None, resp: np.ndarray) -> GaussianStats:
        """`suff_stats` of answered records (n, d) about `shift` (None: their mean, as `prepare`), from their
        responsibilities (n, K): one compiled call for full covariances (a poll's partial mini-batches on the
        consumer's path, where NumPy's call overhead was most of their cost; the sums move the last bits only)."""
        if self.covariance_type != "full" or shift is None or not _compiled(resp.shape[1], rows.shape[1]):
            return self.suff_stats(self.prepare(rows, shift), resp)
        mass, first, second = kernels.answered_moments(_contiguous(rows), _contiguous(shift), _contiguous(resp.T))
        return GaussianStats(shift=shift, mass=mass, first=first, second=second)

    def learn_answered(
        self,
        stats: GaussianStats,
        rows: np.ndarray,
        resp: np.ndarray,
        size: int,
        keeps,
        steps,
        min_count,
        dead_mass,
        head: int = 0,
        pooled: GaussianStats | None = None,
    ) -> tuple[int, GaussianStats, GaussianParams] | None:
        """Stepwise updates from the whole mini-batches of `size` answered rows (n, d) with their
        responsibilities (n, K), in one compiled call: each mini-batch's moments about the running
        shift, then `blend_and_m_step` (weights `keeps[c]`, `steps[c]` / its count). With `head` > 0 the
        first mini-batch is the first `head` rows added to `pooled` (statistics about the running shift).
        Returns (mini-batches learned, statistics, parameters); None where the caller takes the NumPy path
        (other covariance types; the first mini-batch short of `min_count` records or needing the NumPy
        M-step)."""
        if self.covariance_type != "full" or not _compiled(*stats.first.shape):
            return None
        if head:
            if pooled is None or not np.array_equal(pooled.shift, stats.shift):
                return None  # pooled about another shift: the NumPy path re-centres them
            p_mass, p_first, p_second = _contiguous(pooled.mass), _contiguous(pooled.first), _contiguous(pooled.second)
        else:
            p_mass, p_first, p_second = _contiguous(stats.mass), _contiguous(stats.first), _contiguous(stats.second)
        done, shift, mass, first, second, weights, means, cov, chol, log_det, logs = kernels.learn_answered_full(
            _contiguous(rows),
            _contiguous(resp.T),  # writeable too: a read-only array would compile the kernel again
            int(head),
            int(size),
            _contiguous(stats.shift),
            _contiguous(stats.mass),
            _contiguous(stats.first),
            _contiguous(stats.second),
            p_mass,  # (unread without a head)
            p_first,
            p_second,
            np.asarray(keeps, dtype=float),
            np.asarray(steps, dtype=float),
            float(min_count),
            float(dead_mass),
            self.reg_covar,
        )
        if not done:
            return None
        params = GaussianParams(weights, means, cov, "full", chol, log_det)
        params.__dict__["_log_weights"] = logs  # as in blend_and_m_step
        return done, GaussianStats(shift=shift, mass=mass, first=first, second=second), params

    def _numpy_m_step(self, stats: GaussianStats) -> GaussianParams:
        mass = stats.mass + MASS_FLOOR
        offsets = stats.first / mass[:, None]
        means = stats.shift + offsets
        d = means.shape[1]
        kind = self.covariance_type
        if kind == "full":
            cov = unpack_symmetric(stats.second, d)  # a new array: updated in place
            cov /= mass[:, None, None]
            cov -= offsets[:, :, None] * offsets[:, None, :]
            cov.reshape(-1, d * d)[:, :: d + 1] += self.reg_covar  # the diagonals, through a view
        elif kind == "tied":
            second = unpack_symmetric(stats.second, d)
            scatter = second - mass[:, None, None] * offsets[:, :, None] * offsets[:, None, :]
            cov = scatter.sum(axis=0) / mass.sum()
            cov = 0.5 * (cov + cov.T)
            cov[np.arange(d), np.arange(d)] += self.reg_covar
        else:
            cov = stats.second / mass[:, None] - offsets**2
            np.maximum(cov, 0.0, out=cov)
            cov += self.reg_covar
            if kind == "spherical":
                cov = cov.mean(axis=1)
        weights = mass / np.add.reduce(mass)
        return self.make_params(weights, means, cov, repair=True)

    # -- sampling -----------------------------------------------------------------------
    def sample(self, params: GaussianParams, n_samples: int, rng: np.random.Generator):
        """Draw (X (n, d), labels (n,)) from the mixture."""
        counts = rng.multinomial(n_samples, params.weights / params.weights.sum())
        d = params.n_features
        blocks, labels = [], []
        for k, count in enumerate(counts):
            if count == 0:
                continue
            cov = component_covariance(params, k)
            blocks.append(rng.multivariate_normal(params.means[k], cov, size=count, method="cholesky"))
            labels.append(np.full(count, k))
        if not blocks:
            return np.empty((0, d)), np.empty(0, dtype=int)
        return np.vstack(blocks), np.concatenate(labels)


def _compiled(n_components: int, n_features: int) -> bool:
    """The compiled kernels sum components and features as NumPy does up to `kernels.MAX_WIDTH` of them.
    The first use compiles (or loads from numba's cache) all of them at once: a model's first use of one
    is its warm-up fit, so no mini-batch waits for a compilation."""
    if not kernels.compiled[0]:
        kernels.warm_up_kernels()
    return n_components <= kernels.MAX_WIDTH and n_features <= kernels.MAX_WIDTH


def _contiguous(array: np.ndarray) -> np.ndarray:
    """A writeable C-contiguous float64 array: the one type the kernels are compiled for (another layout,
    or a read-only array, would compile them again: seconds on the hot path); no copy when it is one."""
    flags = array.flags
    if flags.c_contiguous and flags.writeable and array.dtype == np.float64:
        return array
    return np.array(array, dtype=np.float64, order="C")


def _precision_cholesky(
    covariances: np.ndarray, kind: str, repair_floor: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangular P with P P^T = inverse covariance, and sum(log diag P) per component.

    Returns (precision Cholesky, log-determinant term, covariances). With
    `repair_floor`, a matrix that rounding left not positive definite has its
    eigenvalues clamped at the floor (the documented rule for a degenerate
    component, e.g. one whose points are all equal) instead of raising.
    """
    if kind in ("diag", "spherical"):
        if repair_floor is not None:
            covariances = np.maximum(covariances, repair_floor)
        if not np.all(np.isfinite(covariances)) or np.any(covariances <= 0.0):
            raise ValueError(f"{kind} covariances must be finite and > 0")
        chol = 1.0 / np.sqrt(covariances)
        # spherical: the caller multiplies by the number of features
        return chol, (np.log(chol).sum(axis=1) if kind == "diag" else np.log(chol)), covariances

    stack = covariances[None] if kind == "tied" else covariances
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2] or not np.logical_and.reduce(np.isfinite(stack), axis=None):
        raise ValueError(f"{kind} covariances must be finite square matrices, got shape {covariances.shape}")
    if repair_floor is None:  # the M-step's matrices are symmetric by construction; a caller's may not be
        asymmetric = np.abs(stack - stack.transpose(0, 2, 1)).max(axis=(1, 2)) > 1e-8 * np.maximum(
            1.0, np.abs(stack).max(axis=(1, 2))
        )
        if asymmetric.any():
            raise ValueError(f"covariance of component {int(np.argmax(asymmetric))} is not symmetric")
    try:
        chol = _inverse_cholesky_factors(stack)
    except np.linalg.LinAlgError:
        try:
            lower = np.linalg.cholesky(stack)
        except np.linalg.LinAlgError:
            if repair_floor is None:
                bad = _first_not_positive_definite(stack)
                raise ValueError(f"covariance of component {bad} is not positive definite") from None
            stack = _clamp_eigenvalues(stack, repair_floor)
            lower = np.linalg.cholesky(stack)
        # Every component's triangular inverse at once; P = inv(L)^T is upper triangular.
        chol = np.linalg.inv(lower).transpose(0, 2, 1)
    log_det = np.add.reduce(np.log(np.diagonal(chol, axis1=1, axis2=2)), axis=1)
    if kind == "tied":
        return chol[0], log_det, stack[0]
    return chol, log_det, stack


# The lower-right block of `_inverse_cholesky_factors`' matrices: large enough that c I - S^-1 stays
# positive definite for any covariance whose Cholesky factor exists (eigenvalues above 1e-190),
# small enough that its square root (1e100) and the block's other entries stay far from overflow.
_BLOCK_SCALE = 1e200


@functools.lru_cache(maxsize=64)
def _inverse_cholesky_template(d: int) -> np.ndarray:
    template = np.zeros((2 * d, 2 * d))
    template[d:, :d] = template[:d, d:] = np.eye(d)
    template[d:, d:] = _BLOCK_SCALE * np.eye(d)
    template.flags.writeable = False
    return template


def _inverse_cholesky_factors(stack: np.ndarray) -> np.ndarray:
    """P = inv(L)^T (K, d, d) for covariances S = L L^T, from one Cholesky factorisation.

    The Cholesky factor of [[S, I], [I, c I]] is [[L, 0], [L^-T, chol(c I - S^-1)]]: its lower-left
    block is P, computed by the factorisation's own triangular solves. One LAPACK call instead of a
    Cholesky and a general inverse (whose LU pivoting a triangular matrix does not need): about half
    the time of the M-step's factorisations for K = 8, d = 10. Raises LinAlgError when S is not
    positive definite (or a block is beyond the scale): the caller then takes the two-step path.
    """
    K, d = stack.shape[0], stack.shape[1]
    blocks = np.empty((K, 2 * d, 2 * d))
    blocks[:] = _inverse_cholesky_template(d)
    blocks[:, :d, :d] = stack
    return np.linalg.cholesky(blocks)[:, d:, :d]


def _first_not_positive_definite(stack: np.ndarray) -> int:
    for k, matrix in enumerate(stack):
        try:
            np.linalg.cholesky(matrix)
        except np.linalg.LinAlgError:
            return k
    return -1


def _clamp_eigenvalues(stack: np.ndarray, floor: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(stack)
    # relative to each matrix's largest eigenvalue too: a floor of 1e-6 under an eigenvalue of 1e20 is
    # below rounding, and the repaired matrix would still not factor (one record of 1e10 did that)
    floors = np.maximum(floor, 1e-12 * np.abs(values).max(axis=1, keepdims=True))
    repaired = (vectors * np.maximum(values, floors)[:, None, :]) @ vectors.transpose(0, 2, 1)
    return 0.5 * (repaired + repaired.transpose(0, 2, 1))


class RecordScorer:
    """log w_k + log N(x | mean_k, cov_k) of a single record, shape (K,).

    The per-record path (`predict_one`, `score_one`) pays NumPy's call overhead
    per operation (~0.5 us each), so everything that depends only on the
    parameters is computed once here, when they change. For full and tied
    covariances a record then costs four small operations: whitened residuals of
    every component from one product `[x, 1] @ A` (A holds the stacked precision
    Cholesky factors and, in its last row, every component's offset), their
    squares, and one product with a block matrix that sums each component's
    squares and scales by -1/2.
    """

    def __init__(self, params: GaussianParams):
        K, d = params.means.shape
        with np.errstate(divide="ignore"):
            log_weights = np.log(params.weights)
        self.constant = log_weights + params.log_det_precision - 0.5 * d * LOG_2PI
        self.kind = params.covariance_type
        chol = params.precisions_cholesky
        if self.kind in ("full", "tied"):
            stacked = chol.transpose(1, 0, 2).reshape(d, K * d) if self.kind == "full" else np.tile(chol, K)
            # offsets computed from centred means, so A's last row carries no cancellation
            centre = params.weights @ params.means
            per_component = chol if self.kind == "full" else np.broadcast_to(chol, (K, d, d))
            offsets = np.einsum("kd,kde->ke", params.means - centre, per_component).reshape(K * d)
            self.affine = np.vstack([stacked, -(centre @ stacked + offsets)])
            self.group = np.kron(np.eye(K), np.full((d, 1), -0.5))  # (K d, K)
        else:
            self.means = params.means
            self.ones = np.ones(d)
            self.precision = chol**2 if self.kind == "diag" else (chol**2)[:, None]

    def __call__(self, x: list) -> np.ndarray:
        if self.kind in ("full", "tied"):
            whitened = np.array(x + [1.0]) @ self.affine
            whitened *= whitened
            return whitened @ self.group + self.constant
        residual = x - self.means
        residual *= residual
        residual *= self.precision
        return self.constant - 0.5 * (residual @ self.ones)
