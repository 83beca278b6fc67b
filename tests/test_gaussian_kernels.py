"""The compiled full-covariance kernels give the numbers of the NumPy code they replace, and of
independent references (scipy's densities, closed-form moments, a matrix inverse)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import logsumexp

from streamem.engines.stepwise import DEAD_MASS, _hold_dead_components
from streamem.families import gaussian_kernels as kernels
from streamem.families.gaussian import GaussianFamily, GaussianStats
from streamem.families.gaussian_linalg import LOG_2PI


def _statistics(rng, K: int, d: int, n: int = 400) -> GaussianStats:
    """Per-record statistics of n records from K well-apart blobs, about a shift off their mean."""
    means = rng.normal(0, 4, (K, d))
    X = means[rng.integers(K, size=n)] + rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.5
    resp = rng.dirichlet(np.ones(K) * 0.3, size=n)
    family = GaussianFamily("full")
    batch = family.prepare(X, X.mean(axis=0) + 0.3)
    return family.suff_stats(batch, resp).scaled(1.0 / n)


@pytest.mark.parametrize(("K", "d"), [(8, 10), (3, 2), (2, 1), (9, 17)])
def test_compiled_m_step_equals_the_numpy_m_step_and_inverts_each_covariance(K, d):
    """Weights, means and covariances are bit for bit the NumPy M-step's; P P^T is each covariance's inverse."""
    family = GaussianFamily("full")
    stats = _statistics(np.random.default_rng(K * d), K, d)
    compiled, reference = family.m_step(stats), family._numpy_m_step(stats)
    for name in ("weights", "means", "covariances"):
        np.testing.assert_array_equal(getattr(compiled, name), getattr(reference, name))
    np.testing.assert_allclose(compiled.precisions_cholesky, reference.precisions_cholesky, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(compiled.log_det_precision, reference.log_det_precision, rtol=1e-12)
    P = compiled.precisions_cholesky
    np.testing.assert_allclose(P @ P.transpose(0, 2, 1), np.linalg.inv(compiled.covariances), rtol=1e-8, atol=1e-10)
    assert np.all(np.tril(P, -1) == 0.0)  # upper triangular, as the NumPy path's


@pytest.mark.parametrize("dead", [False, True])
def test_fused_update_equals_blend_hold_recentre_and_m_step(dead):
    """blend_and_m_step gives bit for bit the statistics of blend, the dead-component hold and the re-centring
    (and NumPy's log-weights)."""
    rng = np.random.default_rng(7)
    family = GaussianFamily("full")
    stats, batch = _statistics(rng, 4, 3), _statistics(rng, 4, 3).scaled(400.0)
    batch = dataclasses.replace(batch, shift=stats.shift)  # the learning path's batches share the shift
    if dead:  # a component with no mass left in either: held at DEAD_MASS
        stats = dataclasses.replace(stats, mass=stats.mass * np.array([1, 1, 1, 1e-12]))
        stats = dataclasses.replace(stats, first=stats.first * np.array([1, 1, 1, 1e-12])[:, None])
        stats = dataclasses.replace(stats, second=stats.second * np.array([1, 1, 1, 1e-12])[:, None])
        batch = dataclasses.replace(batch, mass=batch.mass * np.array([1, 1, 1, 0.0]))
        batch = dataclasses.replace(batch, first=batch.first * np.array([1, 1, 1, 0.0])[:, None])
        batch = dataclasses.replace(batch, second=batch.second * np.array([1, 1, 1, 0.0])[:, None])
    fused_stats, fused_params = family.blend_and_m_step(stats, batch, 0.3, 1 / 400, DEAD_MASS)
    held = _hold_dead_components(stats.blend(batch, 0.3, 1 / 400))
    expected = held.recentred(held.data_mean())
    for name in ("shift", "mass", "first", "second"):
        np.testing.assert_array_equal(getattr(fused_stats, name), getattr(expected, name))
    assert fused_stats.mass[3] == (DEAD_MASS if dead else fused_stats.mass[3])
    np.testing.assert_array_equal(fused_params.covariances, family._numpy_m_step(expected).covariances)
    np.testing.assert_array_equal(fused_params.log_weights, np.log(fused_params.weights))  # the kernel's, cached


def test_full_log_prob_equals_scipy_densities():
    """The compiled E-step's log-densities are scipy's multivariate normal log-pdfs."""
    rng = np.random.default_rng(3)
    family = GaussianFamily("full")
    params = family.m_step(_statistics(rng, 5, 4))
    X = rng.normal(0, 4, (300, 4))
    log_prob = family.log_prob(family.prepare(X, X.mean(axis=0)), params)
    expected = np.column_stack(
        [scipy_stats.multivariate_normal(params.means[k], params.covariances[k]).logpdf(X) for k in range(5)]
    )
    np.testing.assert_allclose(log_prob, expected, rtol=1e-10)
    constant = params.log_det_precision - 0.5 * 4 * LOG_2PI
    distance, far = kernels.closest_distance(np.ascontiguousarray(log_prob.T), constant, 20.0)
    squared = -2.0 * (expected - constant)
    np.testing.assert_allclose(distance, squared.min(axis=1), rtol=1e-8, atol=1e-9)
    assert far == int(np.sum(squared.min(axis=1) > 20.0))


def test_full_expected_stats_equal_weighted_sums_of_the_responsibilities():
    """expected_stats: scipy's logsumexp for the log-likelihood and responsibilities, and the moments as
    closed-form weighted sums of the centred records (mass, first, upper triangle of the outer products)."""
    rng = np.random.default_rng(5)
    family = GaussianFamily("full")
    params = family.m_step(_statistics(rng, 6, 3))
    X = rng.normal(0, 4, (257, 3))
    batch = family.prepare(X, X.mean(axis=0) - 1.0)
    log_norm, resp, stats = family.expected_stats(batch, params)
    weighted = family.log_prob(batch, params) + np.log(params.weights)
    np.testing.assert_allclose(log_norm, logsumexp(weighted, axis=1), rtol=1e-12)
    expected_resp = np.exp(weighted - logsumexp(weighted, axis=1)[:, None])
    np.testing.assert_allclose(resp, expected_resp, rtol=1e-10, atol=1e-300)
    u = batch.centred
    rows, cols = np.triu_indices(3)
    np.testing.assert_allclose(stats.mass, expected_resp.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.first, expected_resp.T @ u, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.second, expected_resp.T @ (u[:, rows] * u[:, cols]), rtol=1e-10, atol=1e-10)


def test_a_covariance_that_is_not_positive_definite_takes_the_repairing_path():
    """A component whose moments say variance 0 (all its records equal) still gets finite factors (the
    NumPy path's eigenvalue clamp), and the compiled M-step says it could not."""
    family = GaussianFamily("full", reg_covar=0.0)
    stats = GaussianStats(
        shift=np.zeros(2), mass=np.array([0.5, 0.5]), first=np.array([[0.5, 0.5], [-0.5, 0.0]]),
        second=np.array([[0.5, 0.5, 0.5], [1.0, 0.0, 1.0]]),
    )
    assert family._compiled_m_step(stats) is None
    params = family.m_step(stats)
    assert np.all(np.isfinite(params.precisions_cholesky))
    np.testing.assert_array_equal(params.means, family._numpy_m_step(stats).means)


def test_learn_many_one_pass_screen_gives_learn_one_statistics_bit_for_bit():
    """Whole mini-batches screened and summarised in one compiled pass end where learn_one ends, bit for bit,
    and a far record among them still takes the general screen (skipped and reported at its row)."""
    import pandas as pd

    import streamem as se

    rng = np.random.default_rng(11)
    X = rng.normal(0, 1, (1500, 3)) + np.where(rng.random(1500) < 0.5, 0.0, 6.0)[:, None]
    X[1300] = [400.0, 0.0, 0.0]  # beyond the threshold below, inside a whole mini-batch of learn_many
    make = lambda: se.OnlineGMM(2, warmup=200, batch_size=100, seed=0, outliers="skip", outlier_threshold=1e3)  # noqa: E731
    one, many = make(), make()
    for row in X:
        one.learn_one(dict(zip("abc", row)))
    many.learn_many(pd.DataFrame(X, columns=list("abc")))
    assert [position for position, _ in many.skipped_] == [1300] and one.n_outliers == many.n_outliers == 1
    for name in ("shift", "mass", "first", "second"):
        np.testing.assert_array_equal(getattr(many.statistics_, name), getattr(one.statistics_, name))
    np.testing.assert_array_equal(many.covariances_, one.covariances_)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_answered_statistics_are_weighted_sums_about_the_shift(kind):
    """answered_stats (a poll's partial mini-batches: compiled for full covariances) are the closed-form
    weighted sums of the records about the given shift, which the statistics keep (the same object)."""
    rng = np.random.default_rng(11)
    family = GaussianFamily(kind)
    X = rng.normal(0, 3, (117, 3))
    resp = rng.dirichlet(np.ones(4), size=117)
    shift = X.mean(axis=0) + 0.7
    stats = family.answered_stats(X, shift, resp)
    u = X - shift
    rows, cols = np.triu_indices(3) if kind == "full" else (np.arange(3), np.arange(3))
    assert stats.shift is shift
    np.testing.assert_allclose(stats.mass, resp.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.first, resp.T @ u, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(stats.second, resp.T @ (u[:, rows] * u[:, cols]), rtol=1e-10, atol=1e-10)


def test_every_path_calls_the_kernels_with_the_one_compiled_type():
    """Averaged parameters (strided factors), an integer threshold, read-only frames, learn_one, apply, answered
    rows (their responsibilities a DataFrame) and batch EM all reach each kernel as the one type it was compiled
    for: none compiles again mid-stream."""
    import pandas as pd

    import streamem as se

    rng = np.random.default_rng(2)
    X = rng.normal(size=(2000, 3))
    frozen = X.copy()
    frozen.flags.writeable = False
    for params in ({"averaging": 2}, {"outlier_threshold": 99}, {}):
        model = se.OnlineGMM(2, seed=0, **params)
        model.learn_many(pd.DataFrame(frozen, columns=list("abc")))
        for row in X[:300]:
            model.learn_one(dict(zip("abc", row)))
        model.apply(model.summarize(X[:200]).statistics)
        model.predict_many(pd.DataFrame(X[:10], columns=list("abc")))
        model.learn_answered(X[300:1000], model.assign_many(X[300:1000])[0])  # partial mini-batches' moments
        # responsibilities as a DataFrame (its values read-only and in Fortran order, as pandas gives them), whole
        # to the compiled calls: the pool is completed first
        head = model.records_until_update
        model.learn_answered(X[1000 : 1000 + head], model.assign_many(X[1000 : 1000 + head])[0])
        answered = pd.DataFrame(model.assign_many(X[1200:1900])[0])
        model.statistics_of(X[1200:1900], answered)
        model.learn_answered(X[1200:1900], answered)
    se.GaussianMixture(2, random_state=0).fit(frozen)
    kernels_used = (kernels.full_log_prob, kernels.screen_full, kernels.full_moments, kernels.full_m_step,
                    kernels.update_full, kernels.closest_distance, kernels.answered_moments,
                    kernels.learn_answered_full)
    for kernel in kernels_used:
        assert len(kernel.signatures) == 1, (kernel.__name__, kernel.signatures)
