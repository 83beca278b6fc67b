"""Missing features: exact marginalisation against closed forms, complete-data fits and real data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import streamem as se
from tests.conftest import DATA


def _mixture(n, rng):
    means = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 0.0], [0.0, 6.0, 4.0]])
    A = rng.normal(0, 0.4, (3, 3, 3))
    covs = A @ A.transpose(0, 2, 1) + np.eye(3) * 0.8
    labels = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    X = np.stack([rng.multivariate_normal(means[k], covs[k]) for k in labels])
    return X, means, covs


def _hide(X, fraction, rng):
    mask = rng.random(X.shape) < fraction
    mask[mask.all(axis=1), 0] = False  # keep one observed feature per record
    hidden = X.copy()
    hidden[mask] = np.nan
    return hidden, mask


def test_marginal_density_and_responsibilities_are_the_closed_form():
    """score_samples and predict_proba of a partly observed record use N(x_o | mu_o, S_oo) per component."""
    rng = np.random.default_rng(0)
    X, _, _ = _mixture(2000, rng)
    gm = se.GaussianMixture(3, random_state=0, missing="marginalize").fit(X)
    record = np.array([[1.0, np.nan, 0.5]])
    observed = [0, 2]
    dens = np.array(
        [
            gm.weights_[k]
            * stats.multivariate_normal(gm.means_[k, observed], gm.covariances_[k][np.ix_(observed, observed)]).pdf(
                record[0, observed]
            )
            for k in range(3)
        ]
    )
    np.testing.assert_allclose(gm.score_samples(record), np.log(dens.sum()), rtol=1e-10)
    np.testing.assert_allclose(gm.predict_proba(record)[0], dens / dens.sum(), rtol=1e-8)


def test_impute_is_gaussian_conditioning():
    """With one component, impute gives mu_m + S_mo S_oo^-1 (x_o - mu_o)."""
    rng = np.random.default_rng(1)
    X = rng.multivariate_normal([1.0, -2.0, 3.0], [[2.0, 0.8, 0.3], [0.8, 1.0, -0.2], [0.3, -0.2, 1.5]], 5000)
    gm = se.GaussianMixture(1, missing="marginalize").fit(X)
    mu, S = gm.means_[0], gm.covariances_[0]
    record = np.array([[2.0, np.nan, np.nan]])
    o, m = [0], [1, 2]
    expected = mu[m] + S[np.ix_(m, o)] @ np.linalg.solve(S[np.ix_(o, o)], record[0, o] - mu[o])
    np.testing.assert_allclose(gm.impute(record)[0, m], expected, rtol=1e-10)
    assert gm.impute(record)[0, 0] == 2.0  # observed values are kept


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_twenty_percent_missing_stays_close_to_the_complete_data_fit(covariance_type):
    """With 20% of values missing at random, means within 0.1 and weights within 0.02 of the
    complete-data fit, the log-likelihood never decreases, and imputation beats the column mean."""
    rng = np.random.default_rng(2)
    X, _, _ = _mixture(6000, rng)
    hidden, mask = _hide(X, 0.2, rng)
    complete = se.GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
    partial = se.GaussianMixture(3, covariance_type=covariance_type, random_state=0, missing="marginalize").fit(hidden)
    order = lambda m: np.argsort(m[:, 0] * 10 + m[:, 1])  # noqa: E731
    a, b = order(complete.means_), order(partial.means_)
    assert np.abs(complete.means_[a] - partial.means_[b]).max() < 0.1
    assert np.abs(complete.weights_[a] - partial.weights_[b]).max() < 0.02
    assert np.all(np.diff(partial.log_likelihoods_) > -1e-9)
    error = np.sqrt(np.mean((partial.impute(hidden)[mask] - X[mask]) ** 2))
    baseline = np.sqrt(np.mean((np.nanmean(hidden, axis=0)[np.nonzero(mask)[1]] - X[mask]) ** 2))
    assert error < 0.8 * baseline


def test_online_model_learns_from_records_with_missing_features():
    """learn_one with None features converges near the batch fit of the same partly missing data."""
    rng = np.random.default_rng(3)
    X, _, _ = _mixture(30_000, rng)
    hidden, _ = _hide(X, 0.2, rng)
    online = se.OnlineGMM(3, batch_size=128, warmup=1000, seed=0, missing="marginalize")
    for row in hidden:
        online.learn_one({name: (None if np.isnan(v) else v) for name, v in zip("abc", row)})
    batch = se.GaussianMixture(3, random_state=0, missing="marginalize").fit(hidden)
    report = se.compare(online, batch, X[:5000])
    assert report.mean_gap < 0.15 and report.weight_gap < 0.02, report
    proba = online.predict_proba_one({"a": 5.0, "b": None, "c": 0.0})
    assert abs(sum(proba.values()) - 1) < 1e-12
    filled = online.impute_one({"a": 5.0, "b": None, "c": 0.0})
    assert filled["a"] == 5.0 and 3.0 < filled["b"] < 7.0


def test_missing_features_are_still_errors_by_default():
    """Without missing="marginalize", a NaN or None is a clear error."""
    with pytest.raises(ValueError, match="NaN value at row 0"):
        se.GaussianMixture(1).fit([[np.nan, 1.0], [1.0, 2.0]])
    with pytest.raises(TypeError, match="feature 'a' is not a number"):
        se.OnlineGMM(2).learn_one({"a": None, "b": 1.0})
    with pytest.raises(ValueError, match="no observed value"):
        se.GaussianMixture(1, missing="marginalize").fit([[np.nan, np.nan], [1.0, 2.0]])


def test_air_quality_with_its_real_missing_values():
    """New York air quality (Ozone and Solar.R have NAs): the fit is finite, EM is monotone, imputed
    ozone stays within the observed range."""
    data = pd.read_csv(DATA / "airquality.csv")[["Ozone", "Solar.R", "Wind", "Temp"]].to_numpy(float)
    assert np.isnan(data).any()
    gm = se.GaussianMixture(2, n_init=3, random_state=0, missing="marginalize").fit(data)
    assert np.all(np.isfinite(gm.means_)) and np.all(np.isfinite(gm.covariances_))
    assert np.all(np.diff(gm.log_likelihoods_) > -1e-9)
    filled = gm.impute(data)
    ozone = data[:, 0]
    assert not np.isnan(filled).any()
    assert np.nanmin(ozone) - 20 < filled[np.isnan(ozone), 0].min() and filled[np.isnan(ozone), 0].max() < np.nanmax(
        ozone
    )
