"""Batch RegressionMixture: seed example 2, E-step closed form, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import streamem as se
from tests.conftest import seed_example_two


def test_seed_example_two_recovers_both_lines():
    """Slopes .5/1.5, intercepts 1/2, noise .1/.2 and weights .5 are recovered (not 0.6444, 0.2708, ...)."""
    X, y = seed_example_two(4000, np.random.default_rng(0))
    rm = se.RegressionMixture(2, tol=1e-10, random_state=0).fit(X, y)
    order = np.argsort(rm.coef_[:, 0])
    np.testing.assert_allclose(rm.coef_[order, 0], [0.5, 1.5], atol=0.01)
    np.testing.assert_allclose(rm.intercept_[order], [1.0, 2.0], atol=0.03)
    np.testing.assert_allclose(np.sqrt(rm.noise_variance_[order]), [0.1, 0.2], atol=0.01)
    np.testing.assert_allclose(rm.weights_[order], [0.5, 0.5], atol=0.03)
    assert rm.converged_


def test_responsibilities_are_the_closed_form():
    """predict_proba(X, y) is w_k N(y | b_k x + a_k, s_k^2) normalised over k, mixing weights included."""
    X, y = seed_example_two(500, np.random.default_rng(1))
    rm = se.RegressionMixture(2, random_state=0).fit(X, y)
    dens = np.stack(
        [
            rm.weights_[k]
            * stats.norm(X[:, 0] * rm.coef_[k, 0] + rm.intercept_[k], np.sqrt(rm.noise_variance_[k])).pdf(y)
            for k in range(2)
        ],
        axis=1,
    )
    np.testing.assert_allclose(rm.predict_proba(X, y), dens / dens.sum(1, keepdims=True), atol=1e-10)
    np.testing.assert_allclose(rm.score_samples(X, y), np.log(dens.sum(1)), rtol=1e-10)


def test_one_component_is_ordinary_least_squares():
    """With K = 1 the fit is the least-squares line and its residual variance."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 3))
    y = X @ [1.0, -1.0, 2.0] + 0.5 + rng.normal(0, 0.5, 300)
    rm = se.RegressionMixture(1, reg_noise=1e-12).fit(X, y)
    design = np.c_[X, np.ones(300)]
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    np.testing.assert_allclose(rm.coef_[0], beta[:3], rtol=1e-9)
    np.testing.assert_allclose(rm.intercept_[0], beta[3], rtol=1e-9)
    np.testing.assert_allclose(rm.noise_variance_[0], np.mean((y - design @ beta) ** 2), rtol=1e-8)
    np.testing.assert_allclose(rm.predict(X), design @ beta, atol=1e-9)


@pytest.mark.filterwarnings("ignore::streamem.ConvergenceWarning")
def test_bic_prefers_two_lines_on_seed_example_two():
    """BIC is lower with 2 lines than with 1 or 3 on seed example 2."""
    X, y = seed_example_two(2000, np.random.default_rng(3))
    bic = {k: se.RegressionMixture(k, n_init=3, random_state=0).fit(X, y).bic(X, y) for k in (1, 2, 3)}
    assert bic[2] < bic[1] and bic[2] < bic[3]


def test_far_from_origin_targets_are_fitted():
    """Features and targets around 1e6 give the true lines' slopes, noise and weights, as the same data near 0."""
    X, y = seed_example_two(2000, np.random.default_rng(4))
    near = se.RegressionMixture(2, random_state=0).fit(X, y)
    far = se.RegressionMixture(2, random_state=0).fit(X + 1e6, y + 1e6)
    a, b = np.argsort(near.coef_[:, 0]), np.argsort(far.coef_[:, 0])
    np.testing.assert_allclose(near.coef_[a, 0], [0.5, 1.5], atol=0.01)  # the truth, so "the same" is not both wrong
    np.testing.assert_allclose(far.coef_[b, 0], near.coef_[a, 0], atol=1e-6)
    # shifting x by 1e6 moves each intercept by (1 - slope) * 1e6; noise and weights do not move
    np.testing.assert_allclose(far.intercept_[b], near.intercept_[a] + (1.0 - near.coef_[a, 0]) * 1e6, atol=1e-4)
    np.testing.assert_allclose(far.noise_variance_[b], near.noise_variance_[a], rtol=1e-6)
    np.testing.assert_allclose(far.weights_[b], near.weights_[a], atol=1e-9)


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        ([[1.0], [2.0]], [1.0, np.nan], "y contains a NaN value at row 1"),
        ([[1.0], [2.0]], [1.0], "y has 1 values but X has 2 samples"),
        ([[1.0], [np.inf]], [1.0, 2.0], "X contains a infinite value"),
        ([[1.0], [2.0]], ["a", "b"], "y contains non-numeric"),
    ],
)
def test_bad_input_is_named(X, y, message):
    """NaN, inf, strings and mismatched lengths raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        se.RegressionMixture(1).fit(X, y)
