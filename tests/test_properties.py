"""Properties of EM that hold for any data (hypothesis)."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import streamem as se
from streamem.families import COVARIANCE_TYPES

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
datasets = st.integers(8, 40).flatmap(lambda n: arrays(np.float64, (n, 2), elements=finite))


@given(X=datasets, covariance_type=st.sampled_from(COVARIANCE_TYPES), K=st.integers(1, 4), seed=st.integers(0, 9))
def test_em_invariants(X, covariance_type, K, seed):
    """Log-likelihood never decreases; weights sum to 1; covariances stay positive definite; nothing NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        gm = se.GaussianMixture(K, covariance_type=covariance_type, max_iter=30, random_state=seed).fit(X)
    trace = np.array(gm.log_likelihoods_)
    assert np.all(np.isfinite(trace))
    # EM is monotone in the likelihood. reg_covar (1e-6) perturbs each M-step, which
    # matters only where a direction has collapsed to ~0 variance: allow dips of 1e-5.
    assert np.all(np.diff(trace) >= -1e-5 * (1 + np.abs(trace[:-1])))
    assert abs(gm.weights_.sum() - 1.0) < 1e-12 and np.all(gm.weights_ >= 0)
    for value in (gm.means_, gm.covariances_, gm.score_samples(X)):
        assert np.all(np.isfinite(value))
    covs = gm.covariances_
    if covariance_type == "full":
        assert np.all(np.linalg.eigvalsh(covs) > 0)
    elif covariance_type == "tied":
        assert np.all(np.linalg.eigvalsh(covs) > 0)
    else:
        assert np.all(covs > 0)


@given(X=datasets, K=st.integers(1, 3), seed=st.integers(0, 9))
def test_regression_em_invariants(X, K, seed):
    """Regression EM: monotone log-likelihood, positive noise variances, finite everything."""
    y = X[:, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        rm = se.RegressionMixture(K, max_iter=30, random_state=seed).fit(X[:, :1], y)
    trace = np.array(rm.log_likelihoods_)
    assert np.all(np.isfinite(trace))
    assert np.all(np.diff(trace) >= -1e-5 * (1 + np.abs(trace[:-1])))
    assert np.all(rm.noise_variance_ > 0) and abs(rm.weights_.sum() - 1) < 1e-12
    assert np.all(np.isfinite(rm.coef_)) and np.all(np.isfinite(rm.intercept_))
