"""Batch GaussianMixture: seed example 1, scikit-learn equivalence, model selection, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

import streamem as se
from streamem.families import COVARIANCE_TYPES, GaussianFamily
from tests.conftest import well_separated

SEED_ONE = np.array([1.0, 1.5, 2.0, 8.0, 8.5, 9.0])[:, None]


def test_seed_example_one_first_e_step_is_the_closed_form():
    """The first E-step of seed example 1 gives N(x|2,1) / (N(x|2,1) + N(x|7,1)) (0.999996 at x=2)."""
    family = GaussianFamily("spherical")
    params = family.make_params([0.5, 0.5], [[2.0], [7.0]], [1.0, 1.0])
    resp = np.exp(family.e_step(family.prepare(SEED_ONE), params)[1])
    first = stats.norm(2, 1).pdf(SEED_ONE[:, 0])
    expected = first / (first + stats.norm(7, 1).pdf(SEED_ONE[:, 0]))
    np.testing.assert_allclose(resp[:, 0], expected, rtol=1e-12)
    assert resp[2, 0] == pytest.approx(0.999996, abs=5e-7)


def test_seed_example_one_converges_to_the_two_clusters():
    """EM from pi=(.5,.5), mu=(2,7), sigma=(1,1) ends at means 1.5/8.5, variances 1/6, weights .5."""
    gm = se.GaussianMixture(
        2,
        weights_init=[0.5, 0.5],
        means_init=[[2.0], [7.0]],
        covariances_init=[[[1.0]], [[1.0]]],
        tol=1e-12,
        reg_covar=0.0,
    ).fit(SEED_ONE)
    np.testing.assert_allclose(gm.means_.ravel(), [1.5, 8.5], atol=1e-9)
    np.testing.assert_allclose(gm.covariances_.ravel(), [1 / 6, 1 / 6], atol=1e-9)
    np.testing.assert_allclose(gm.weights_, [0.5, 0.5], atol=1e-9)
    assert gm.converged_


def _sklearn_precisions(covariances, covariance_type):
    if covariance_type in ("diag", "spherical"):
        return 1.0 / covariances
    return np.linalg.inv(covariances)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_matches_scikit_learn_from_the_same_start(covariance_type, stock_returns):
    """From the same start, EM converges to scikit-learn's parameters, scores, BIC and AIC."""
    X = stock_returns * 100  # percent returns: a real, heavy-tailed 4-D dataset
    rng = np.random.default_rng(5)
    K = 3
    means = X[rng.choice(len(X), K, replace=False)]
    covariances = {
        "full": np.stack([np.cov(X.T)] * K),
        "tied": np.cov(X.T),
        "diag": np.tile(X.var(0), (K, 1)),
        "spherical": np.full(K, X.var()),
    }[covariance_type]
    weights = np.full(K, 1 / K)
    common = dict(covariance_type=covariance_type, tol=1e-10, max_iter=5000, weights_init=weights, means_init=means)
    ours = se.GaussianMixture(K, covariances_init=covariances, **common).fit(X)
    theirs = SklearnGaussianMixture(K, precisions_init=_sklearn_precisions(covariances, covariance_type), **common).fit(
        X
    )
    assert abs(ours.score(X) - theirs.score(X)) < 1e-4
    np.testing.assert_allclose(ours.weights_, theirs.weights_, atol=1e-5)
    np.testing.assert_allclose(ours.means_, theirs.means_, atol=1e-4)
    np.testing.assert_allclose(ours.covariances_, theirs.covariances_, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ours.score_samples(X), theirs.score_samples(X), atol=1e-3)
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-3)
    assert ours.bic(X) == pytest.approx(theirs.bic(X), rel=1e-6)
    assert ours.aic(X) == pytest.approx(theirs.aic(X), rel=1e-6)


def test_old_faithful_matches_scikit_learn(faithful):
    """On Old Faithful, k-means++ starts reach scikit-learn's best log-likelihood."""
    ours = se.GaussianMixture(2, n_init=3, tol=1e-10, random_state=0).fit(faithful)
    theirs = SklearnGaussianMixture(2, n_init=3, tol=1e-10, max_iter=1000, random_state=0).fit(faithful)
    assert ours.score(faithful) == pytest.approx(theirs.score(faithful), abs=1e-4)
    order = np.argsort(ours.means_[:, 0])
    np.testing.assert_allclose(ours.means_[order], theirs.means_[np.argsort(theirs.means_[:, 0])], atol=1e-3)


@pytest.mark.filterwarnings("ignore::streamem.ConvergenceWarning")
def test_bic_picks_the_true_number_of_components():
    """On well-separated data from 3 components, BIC is lowest at K = 3."""
    X, _, _ = well_separated(1500, np.random.default_rng(6), n_components=3)
    bics = [se.GaussianMixture(k, n_init=2, random_state=0).fit(X).bic(X) for k in range(1, 7)]
    assert int(np.argmin(bics)) + 1 == 3


def test_fit_predict_equals_fit_then_predict():
    """fit_predict(X) gives the labels predict(X) gives after fit(X)."""
    X, _, _ = well_separated(500, np.random.default_rng(7))
    a = se.GaussianMixture(3, random_state=1).fit_predict(X)
    b = se.GaussianMixture(3, random_state=1).fit(X).predict(X)
    np.testing.assert_array_equal(a, b)


def test_random_state_makes_fits_reproducible():
    """The same random_state gives the same parameters; init methods all converge."""
    X, _, _ = well_separated(400, np.random.default_rng(8))
    for init in ("kmeans++", "random", "random_from_data"):
        a = se.GaussianMixture(3, init=init, random_state=3).fit(X)
        b = se.GaussianMixture(3, init=init, random_state=3).fit(X)
        np.testing.assert_array_equal(a.means_, b.means_)
        assert a.converged_


def test_likelihood_trace_and_convergence_warning():
    """log_likelihoods_ records every iteration; running out of max_iter warns."""
    X, _, _ = well_separated(300, np.random.default_rng(9))
    with pytest.warns(se.ConvergenceWarning, match="max_iter=2"):
        gm = se.GaussianMixture(3, max_iter=2, tol=0.0, init="random", random_state=0).fit(X)
    assert len(gm.log_likelihoods_) == gm.n_iter_ == 2
    assert not gm.converged_


def test_sample_draws_from_the_fitted_mixture():
    """sample(n) returns n records whose labels follow the weights and whose mean follows the means."""
    gm = se.GaussianMixture(2, random_state=0).fit(SEED_ONE)
    X, labels = gm.sample(20000)
    assert X.shape == (20000, 1)
    assert abs((labels == 0).mean() - gm.weights_[0]) < 0.02
    assert abs(X[labels == 1].mean() - gm.means_[1, 0]) < 0.02


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize(
    "X",
    [
        np.full((20, 2), 3.0),
        np.array([[0.0, 0.0]] * 10 + [[1.0, 1.0]] * 10),
        np.random.default_rng(0).normal(size=(5, 12)),
    ],
    ids=["all-equal", "two-distinct-points-three-components", "d-greater-than-n"],
)
def test_degenerate_data_gives_finite_parameters(covariance_type, X):
    """All-equal points, fewer distinct points than components, and d > n give finite parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        gm = se.GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    for value in (gm.weights_, gm.means_, gm.covariances_, gm.score_samples(X)):
        assert np.all(np.isfinite(value))
    assert gm.weights_.sum() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("X", "message"),
    [
        ([[1.0, np.nan], [2.0, 3.0]], "NaN value at row 0, column 1"),
        ([[1.0, 2.0], [np.inf, 3.0]], "infinite value at row 1, column 0"),
        ([["a", "b"], ["c", "d"]], "non-numeric"),
        ([1.0, 2.0, 3.0], "must be 2-D"),
        (np.empty((0, 2)), "0 samples"),
        ([[1.0], [2.0]], "fewer than n_components=3"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_problem(X, message):
    """NaN, inf, strings, wrong dimension, empty or too few records: ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        se.GaussianMixture(3).fit(X)


def test_predict_checks_the_number_of_features():
    """predict on records with the wrong number of features names both counts."""
    gm = se.GaussianMixture(2, random_state=0).fit(SEED_ONE)
    with pytest.raises(ValueError, match="2 features, but the model was fitted with 1"):
        gm.predict([[1.0, 2.0]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_components": 0}, "n_components must be an integer >= 1"),
        ({"covariance_type": "banana"}, "covariance_type must be one of"),
        ({"init": "magic"}, "init must be one of"),
        ({"tol": -1.0}, "tol must be"),
        ({"means_init": [[0.0, 0.0]]}, "means_init must have 2 rows"),
        ({"covariances_init": np.ones((2, 2))}, "covariances_init must have shape"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    """Invalid constructor arguments raise a ValueError naming the argument."""
    params = {"n_components": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        se.GaussianMixture(**params).fit(np.random.default_rng(0).normal(size=(20, 2)))


def test_not_fitted_is_a_clear_error():
    """Calling predict before fit raises NotFittedError."""
    with pytest.raises(se.NotFittedError, match="call fit first"):
        se.GaussianMixture(2).predict([[0.0]])
