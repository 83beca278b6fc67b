"""Model families: densities against scipy, statistics that add, scale and re-centre."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from streamem.families import COVARIANCE_TYPES, GaussianFamily, RegressionFamily
from streamem.families.gaussian import full_covariances


def _random_params(family: GaussianFamily, rng, K=3, d=3):
    weights = rng.dirichlet(np.ones(K))
    means = rng.normal(0, 3, (K, d))
    A = rng.normal(size=(K, d, d))
    full = A @ A.transpose(0, 2, 1) + np.eye(d)
    covariances = {
        "full": full,
        "tied": full[0],
        "diag": np.abs(rng.normal(1, 0.3, (K, d))) + 0.1,
        "spherical": np.abs(rng.normal(1, 0.3, K)) + 0.1,
    }[family.covariance_type]
    return family.make_params(weights, means, covariances)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_prob_matches_scipy(covariance_type):
    """Each component's log-density equals scipy.stats.multivariate_normal.logpdf."""
    rng = np.random.default_rng(0)
    family = GaussianFamily(covariance_type)
    params = _random_params(family, rng)
    X = rng.normal(0, 4, (50, 3))
    ours = family.log_prob(family.prepare(X), params)
    covs = full_covariances(params)
    for k in range(3):
        expected = stats.multivariate_normal(params.means[k], covs[k]).logpdf(X)
        np.testing.assert_allclose(ours[:, k], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_chunked_statistics_equal_one_pass(covariance_type):
    """Statistics summed over chunks (with different shifts) equal one pass over all records."""
    rng = np.random.default_rng(1)
    family = GaussianFamily(covariance_type)
    X = rng.normal(5, 2, (300, 3))
    resp = rng.dirichlet(np.ones(4), size=300)
    whole = family.suff_stats(family.prepare(X), resp)
    parts = [family.suff_stats(family.prepare(X[i : i + 70]), resp[i : i + 70]) for i in range(0, 300, 70)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    total = total.recentred(whole.shift)
    np.testing.assert_allclose(total.mass, whole.mass, rtol=1e-12)
    np.testing.assert_allclose(total.first, whole.first, atol=1e-9)
    np.testing.assert_allclose(total.second, whole.second, rtol=1e-10, atol=1e-9)


def test_statistics_far_from_origin_keep_their_digits():
    """Records around 1e6 with unit spread give the covariance computed on the centred data."""
    rng = np.random.default_rng(2)
    X = 1e6 + rng.normal(size=(5000, 2)) @ np.array([[1.0, 0.0], [0.5, 0.8]])
    family = GaussianFamily("full", reg_covar=0.0)
    params = family.m_step(family.suff_stats(family.prepare(X), np.ones((5000, 1))))
    np.testing.assert_allclose(params.covariances[0], np.cov(X.T, bias=True), rtol=1e-9)
    np.testing.assert_allclose(params.means[0], X.mean(axis=0), rtol=1e-14)


def test_regression_statistics_recentre_exactly():
    """Regression statistics moved to a new shift equal statistics computed about it."""
    rng = np.random.default_rng(3)
    family = RegressionFamily()
    X = rng.normal(3, 1, (200, 2))
    y = X @ [1.0, -2.0] + 4 + rng.normal(size=200)
    resp = rng.dirichlet(np.ones(2), size=200)
    about_a = family.suff_stats(family.prepare(X, y, shift=np.array([1.0, 2.0, 3.0])), resp)
    about_b = family.suff_stats(family.prepare(X, y, shift=np.array([-4.0, 0.5, 10.0])), resp)
    moved = about_a.recentred(about_b.shift)
    for name in ("mass", "xx", "xy", "yy"):
        np.testing.assert_allclose(getattr(moved, name), getattr(about_b, name), rtol=1e-10, atol=1e-8)


def test_regression_m_step_is_weighted_least_squares():
    """The M-step solves each component's weighted least squares, as numpy.linalg.lstsq does."""
    rng = np.random.default_rng(4)
    family = RegressionFamily(reg_noise=0.0)
    X = rng.normal(size=(400, 3))
    y = X @ [0.5, 1.0, -1.0] + 2.0 + rng.normal(0, 0.3, 400)
    resp = rng.dirichlet(np.ones(2), size=400)
    params = family.m_step(family.suff_stats(family.prepare(X, y), resp))
    design = np.c_[X, np.ones(400)]
    for k in range(2):
        root = np.sqrt(resp[:, k])
        beta = np.linalg.lstsq(design * root[:, None], y * root, rcond=None)[0]
        np.testing.assert_allclose(params.coef[k], beta[:3], rtol=1e-8)
        np.testing.assert_allclose(params.intercept[k], beta[3], rtol=1e-8)
        residual = y - design @ beta
        np.testing.assert_allclose(
            params.noise_variance[k], (resp[:, k] * residual**2).sum() / resp[:, k].sum(), rtol=1e-8
        )


def test_make_params_rejects_non_positive_definite():
    """A covariance that is not positive definite is refused with a clear message."""
    family = GaussianFamily("full")
    with pytest.raises(ValueError, match="not positive definite"):
        family.make_params([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_record_scorer_equals_the_batch_e_step(covariance_type):
    """The per-record scorer gives the batch path's log w_k + log N(x | k), also for data near 1e6."""
    from streamem.families.gaussian import RecordScorer

    rng = np.random.default_rng(5)
    family = GaussianFamily(covariance_type)
    for offset in (0.0, 1e6):
        params = _random_params(family, rng)
        params = family.make_params(params.weights, params.means + offset, params.covariances)
        X = offset + rng.normal(0, 3, (20, 3))
        expected = family.weighted_log_prob(family.prepare(X), params)
        scorer = RecordScorer(params)
        for row, want in zip(X.tolist(), expected):
            np.testing.assert_allclose(scorer(row), want, rtol=1e-9, atol=1e-7)
