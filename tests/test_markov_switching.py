"""MarkovSwitchingRegression: published Markov-switching fits (Stata, via statsmodels' tests), a NumPy forward
algorithm and brute-force Viterbi at fixed parameters, the one-step forecast, bad input."""

from __future__ import annotations

import numpy as np

from streamem.families.regression import RegressionFamily


def test_shared_variance_m_step_pools_the_residuals():
    """RegressionFamily(shared_variance=True): each state's weighted least squares (numpy lstsq), one variance
    = sum over states of the weighted residual sums of squares / number of records."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(400, 2))
    y = X @ [0.5, -1.0] + 2.0 + rng.normal(0, 0.3, 400)
    resp = rng.dirichlet(np.ones(3), size=400)
    family = RegressionFamily(reg_noise=0.0, shared_variance=True)
    params = family.m_step(family.suff_stats(family.prepare(X, y), resp))
    design = np.c_[X, np.ones(400)]
    rss = 0.0
    for k in range(3):
        root = np.sqrt(resp[:, k])
        beta = np.linalg.lstsq(design * root[:, None], y * root, rcond=None)[0]
        np.testing.assert_allclose(params.coef[k], beta[:2], rtol=1e-8)
        np.testing.assert_allclose(params.intercept[k], beta[2], rtol=1e-8)
        rss += (resp[:, k] * (y - design @ beta) ** 2).sum()
    np.testing.assert_allclose(params.noise_variance, np.full(3, rss / 400), rtol=1e-8)
    assert family.n_parameters(3, 2) == 3 * 3 + 1 + 2  # lines, one variance, two free weights
