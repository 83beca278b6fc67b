"""Gaussian mixture family: log responsibilities, sufficient statistics and M-step.

Four covariance types share one code path, picked by `covariance_type` as in
scikit-learn: ``full`` (K, d, d), ``tied`` (d, d), ``diag`` (K, d), ``spherical`` (K,).

Why it is fast: the E-step computes every component's whitened residuals with a
single matrix product ``X @ [P_1 ... P_K]`` (P_k the precision Cholesky factors),
and the statistics of every component come from two more products,
``resp.T @ X`` and ``resp.T @ (X outer X)``. There is no Python loop over
components on the per-record path.

Why it stays accurate: every batch is centred on a shift before any moment is
taken, so data around 1e6 with unit spread keeps its digits.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from streamem.families.base import MASS_FLOOR, SufficientStatistics, log_responsibilities, responsibilities

__all__ = [
    "COVARIANCE_TYPES",
    "GaussianBatch",
    "GaussianFamily",
    "GaussianParams",
    "GaussianStats",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
_LOG_2PI = math.log(2.0 * math.pi)


@functools.lru_cache(maxsize=64)
def _upper_triangle(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a d x d upper triangle, cached: the online update needs them per
    mini-batch and building them cost half of a small model's update."""
    rows, cols = np.triu_indices(d)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


@dataclasses.dataclass(frozen=True)
class GaussianBatch:
    """Records centred on a shift: `centred = X - shift`, shape (n_samples, n_features).

    `squares` optionally caches the products the second moments need: for full and
    tied covariances the upper triangle of each record's outer product, packed as
    (n, d (d + 1) / 2); for diag and spherical the squares (n, d). Batch EM computes
    them once per fit instead of once per iteration.
    """

    centred: np.ndarray
    shift: np.ndarray
    squares: np.ndarray | None = None
    has_missing: bool = False  # NaN marks a missing feature (marginalised in the E-step)

    @property
    def n_samples(self) -> int:
        return self.centred.shape[0]

    def __getitem__(self, rows: slice) -> GaussianBatch:
        squares = None if self.squares is None else self.squares[rows]
        return GaussianBatch(self.centred[rows], self.shift, squares, self.has_missing)


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
        return self.shift + self.first.sum(axis=0) / max(self.mass.sum(), MASS_FLOOR)

    @classmethod
    def field_shapes(cls, n_components: int, width: int, document: dict | None = None) -> dict[str, tuple[int, ...]]:
        """`second` is packed upper triangles (full, tied) or diagonals (diag, spherical): the
        document's own layout is taken when it is one of the two."""
        K, d = n_components, width
        packed = (K, d * (d + 1) // 2)
        second = (K, d) if document is None or np.shape(document.get("second")) != packed else packed
        return {"shift": (d,), "mass": (K,), "first": (K, d), "second": second}

    def recentred(self, shift: np.ndarray) -> GaussianStats:
        delta = self.shift - shift  # x - new = (x - old) + delta
        first = self.first + self.mass[:, None] * delta
        d = delta.shape[0]
        if self.second.shape[1] == d:  # diagonal moments
            second = self.second + 2.0 * self.first * delta + self.mass[:, None] * delta**2
        else:  # packed upper triangles: u_i u_j + u_i delta_j + delta_i u_j + delta_i delta_j
            rows, cols = _upper_triangle(d)
            second = (
                self.second
                + self.first[:, rows] * delta[cols]
                + delta[rows] * self.first[:, cols]
                + self.mass[:, None] * (delta[rows] * delta[cols])
            )
        return GaussianStats(shift=np.array(shift, dtype=float), mass=self.mass.copy(), first=first, second=second)


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
        has_missing = bool(np.isnan(X).any())
        if shift is None and has_missing:
            observed = ~np.isnan(X)
            counts = observed.sum(axis=0)  # a column with no observed value is centred at 0
            shift = np.where(observed, X, 0.0).sum(axis=0) / np.maximum(counts, 1)
        elif shift is None:
            shift = X.mean(axis=0)
        shift = np.asarray(shift, dtype=float)
        centred = X - shift
        squares = self._squares(centred) if cache_squares and not has_missing else None
        return GaussianBatch(centred=centred, shift=shift, squares=squares, has_missing=has_missing)

    def _squares(self, centred: np.ndarray) -> np.ndarray:
        if self.covariance_type in ("full", "tied"):
            rows, cols = _upper_triangle(centred.shape[1])
            return np.multiply(centred[:, rows], centred[:, cols])
        return centred * centred

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
        if weights.shape != (means.shape[0],) or not np.isfinite(weights).all() or (weights < 0).any():
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
        """log N(x | mean_k, cov_k) for every record and component, shape (n, K)."""
        X = batch.centred
        means = params.means - batch.shift
        n, d = X.shape
        K = means.shape[0]
        chol = params.precisions_cholesky
        kind = params.covariance_type
        if kind == "full":
            stacked = chol.transpose(1, 0, 2).reshape(d, K * d)
            offsets = np.einsum("kd,kde->ke", means, chol).reshape(K * d)
            whitened = X @ stacked
            whitened -= offsets
            whitened *= whitened
            # summing groups of d columns by a matrix-vector product beats .sum(axis=2)
            mahalanobis = (whitened.reshape(n * K, d) @ np.ones(d)).reshape(n, K)
        elif kind == "tied":
            whitened = (X @ chol)[:, None, :] - (means @ chol)[None, :, :]
            mahalanobis = np.einsum("nkd,nkd->nk", whitened, whitened)
        elif kind == "diag":
            precision = chol**2
            squares = X * X if batch.squares is None else batch.squares
            mahalanobis = squares @ precision.T
            mahalanobis -= X @ (2.0 * means * precision).T
            mahalanobis += (means**2 * precision).sum(1)
            np.maximum(mahalanobis, 0.0, out=mahalanobis)  # the expansion can dip below 0 by rounding
        else:  # spherical
            precision = chol**2
            squares = X * X if batch.squares is None else batch.squares
            mahalanobis = (squares.sum(1)[:, None] - 2.0 * (X @ means.T) + (means**2).sum(1)) * precision
            np.maximum(mahalanobis, 0.0, out=mahalanobis)
        mahalanobis *= -0.5
        mahalanobis += params.log_det_precision - 0.5 * d * _LOG_2PI
        return mahalanobis

    def weighted_log_prob(
        self, batch: GaussianBatch, params: GaussianParams, log_prob: np.ndarray | None = None
    ) -> np.ndarray:
        """log w_k + log N(x | mean_k, cov_k), shape (n, K); from `log_prob` (updated in place) if given."""
        if params.weights.all():
            log_weights = np.log(params.weights)
        else:
            with np.errstate(divide="ignore"):  # a weight of exactly 0 is log 0 = -inf, by design
                log_weights = np.log(params.weights)
        weighted = self.log_prob(batch, params) if log_prob is None else log_prob
        weighted += log_weights
        return weighted

    def e_step(self, batch: GaussianBatch, params: GaussianParams) -> tuple[np.ndarray, np.ndarray]:
        """Per-record log-likelihood (n,) and log responsibilities (n, K)."""
        if batch.has_missing:
            from streamem.families.gaussian_missing import missing_e_step

            log_norm, resp, _ = missing_e_step(batch.centred + batch.shift, batch.shift, params)
            with np.errstate(divide="ignore"):
                return log_norm, np.log(resp)
        return log_responsibilities(self.weighted_log_prob(batch, params))

    def expected_stats(self, batch: GaussianBatch, params: GaussianParams, log_prob: np.ndarray | None = None):
        """E-step and expected statistics in one: (log-likelihood (n,), responsibilities (n, K), stats).

        Missing features (NaN) are marginalised exactly (see `gaussian_missing`). `log_prob`:
        `log_prob(batch, params)` if the caller has it already (it is overwritten).
        """
        if batch.has_missing:
            from streamem.families.gaussian_missing import missing_e_step

            return missing_e_step(batch.centred + batch.shift, batch.shift, params)
        log_norm, resp = responsibilities(self.weighted_log_prob(batch, params, log_prob))
        return log_norm, resp, self.suff_stats(batch, resp)

    # -- statistics and M-step ----------------------------------------------------------
    def suff_stats(self, batch: GaussianBatch, resp: np.ndarray) -> GaussianStats:
        """Moments of a batch about its shift, weighted by responsibilities (n, K)."""
        X = batch.centred
        squares = self._squares(X) if batch.squares is None else batch.squares
        mass = resp.sum(axis=0)
        first = resp.T @ X
        second = resp.T @ squares
        return GaussianStats(shift=batch.shift, mass=mass, first=first, second=second)

    def m_step(self, stats: GaussianStats) -> GaussianParams:
        """Maximum-likelihood parameters from statistics, plus `reg_covar` on the diagonal."""
        mass = stats.mass + MASS_FLOOR
        offsets = stats.first / mass[:, None]
        means = stats.shift + offsets
        d = means.shape[1]
        kind = self.covariance_type
        if kind == "full":
            second = unpack_symmetric(stats.second, d)
            cov = second / mass[:, None, None] - offsets[:, :, None] * offsets[:, None, :]
            cov[:, np.arange(d), np.arange(d)] += self.reg_covar
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
        weights = mass / mass.sum()
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
            cov = _component_covariance(params, k)
            blocks.append(rng.multivariate_normal(params.means[k], cov, size=count, method="cholesky"))
            labels.append(np.full(count, k))
        if not blocks:
            return np.empty((0, d)), np.empty(0, dtype=int)
        return np.vstack(blocks), np.concatenate(labels)


def unpack_symmetric(packed: np.ndarray, d: int) -> np.ndarray:
    """(K, d (d + 1) / 2) upper triangles -> (K, d, d) symmetric matrices."""
    rows, cols = _upper_triangle(d)
    out = np.empty((packed.shape[0], d, d))
    out[:, rows, cols] = packed
    out[:, cols, rows] = packed
    return out


def full_covariances(params: GaussianParams) -> np.ndarray:
    """Every component's covariance as a (K, d, d) array, whatever the type."""
    return np.stack([_component_covariance(params, k) for k in range(params.n_components)])


def _component_covariance(params: GaussianParams, k: int) -> np.ndarray:
    cov = params.covariances
    d = params.n_features
    return {
        "full": lambda: cov[k],
        "tied": lambda: cov,
        "diag": lambda: np.diag(cov[k]),
        "spherical": lambda: np.eye(d) * cov[k],
    }[params.covariance_type]()


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
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2] or not np.isfinite(stack).all():
        raise ValueError(f"{kind} covariances must be finite square matrices, got shape {covariances.shape}")
    if repair_floor is None:  # the M-step's matrices are symmetric by construction; a caller's may not be
        asymmetric = np.abs(stack - stack.transpose(0, 2, 1)).max(axis=(1, 2)) > 1e-8 * np.maximum(
            1.0, np.abs(stack).max(axis=(1, 2))
        )
        if asymmetric.any():
            raise ValueError(f"covariance of component {int(np.argmax(asymmetric))} is not symmetric")
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
    log_det = np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    if kind == "tied":
        return chol[0], log_det, stack[0]
    return chol, log_det, stack


def _first_not_positive_definite(stack: np.ndarray) -> int:
    for k, matrix in enumerate(stack):
        try:
            np.linalg.cholesky(matrix)
        except np.linalg.LinAlgError:
            return k
    return -1


def _clamp_eigenvalues(stack: np.ndarray, floor: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(stack)
    repaired = (vectors * np.maximum(values, floor)[:, None, :]) @ vectors.transpose(0, 2, 1)
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
        self.constant = log_weights + params.log_det_precision - 0.5 * d * _LOG_2PI
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
