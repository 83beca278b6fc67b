"""OnlineGMM against the batch reference and closed forms; drift tracking; River pipelines."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from river import preprocessing

import streamem as se
from streamem.schedules import StepSize


def _mixture(n: int, rng, weights, means, scales):
    labels = rng.choice(len(weights), size=n, p=weights)
    X = means[labels] + rng.normal(size=(n, means.shape[1])) * scales[labels]
    return X, labels


@pytest.fixture(scope="module")
def stationary_stream():
    """200k training and 20k held-out records of a 5-component 4-D mixture, and batch EM on the 200k."""
    rng = np.random.default_rng(0)
    weights = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    means = rng.normal(0, 4, (5, 4))
    scales = rng.uniform(0.6, 1.4, (5, 4))
    X, _ = _mixture(200_000, rng, weights, means, scales)
    held_out, _ = _mixture(20_000, rng, weights, means, scales)
    return X, held_out, se.GaussianMixture(5, n_init=3, random_state=0).fit(X)


def test_stationary_stream_matches_batch_em_on_the_same_data(stationary_stream):
    """200k records, 5 components in 4-D, default schedule: online means within 0.05, weights within
    0.01 of batch EM on the same data, held-out log-likelihood within 0.01 nats per record."""
    X, held_out, batch = stationary_stream
    online = se.OnlineGMM(5, batch_size=256, warmup=2000, seed=0)
    online.learn_many(pd.DataFrame(X, columns=list("abcd")))
    report = se.compare(online, batch, held_out)
    assert report.mean_gap < 0.05, report
    assert report.weight_gap < 0.01, report
    assert abs(report.log_likelihood_gap) < 0.01, report


def test_polyak_averaging_gets_closer_to_batch_em(stationary_stream):
    """alpha=0.6 with Polyak-Ruppert averaging lands within 0.02 of batch EM's means (the default: ~0.024)."""
    X, held_out, batch = stationary_stream
    online = se.OnlineGMM(5, batch_size=256, warmup=2000, seed=0, step=StepSize(alpha=0.6), averaging=50)
    online.learn_many(pd.DataFrame(X, columns=list("abcd")))
    report = se.compare(online, batch, held_out)
    assert report.mean_gap < 0.02 and report.weight_gap < 0.005, report


def test_seed_example_one_stream_is_recovered_by_learn_one():
    """A learn_one stream from N(1.5, .5^2) / N(8.5, .5^2), p = .5, gives those means, sds and weights."""
    rng = np.random.default_rng(1)
    model = se.OnlineGMM(2, batch_size=64, warmup=300, seed=0)
    for _ in range(20_000):
        model.learn_one({"x": rng.normal(1.5 if rng.random() < 0.5 else 8.5, 0.5)})
    order = np.argsort(model.means_[:, 0])
    np.testing.assert_allclose(model.means_[order, 0], [1.5, 8.5], atol=0.03)
    np.testing.assert_allclose(np.sqrt(model.covariances_[order, 0, 0]), [0.5, 0.5], atol=0.03)
    np.testing.assert_allclose(model.weights_[order], [0.5, 0.5], atol=0.03)


def test_old_faithful_stream_agrees_with_batch_em(faithful):
    """Old Faithful replayed 20 times as a stream lands on batch EM's two components."""
    rng = np.random.default_rng(2)
    stream = np.vstack([faithful[rng.permutation(len(faithful))] for _ in range(20)])
    online = se.OnlineGMM(2, batch_size=32, warmup=272, seed=0, step=StepSize(alpha=1.0, t0=1.0))
    online.learn_many(pd.DataFrame(stream, columns=["eruptions", "waiting"]))
    batch = se.GaussianMixture(2, n_init=3, random_state=0).fit(faithful)
    report = se.compare(online, batch, faithful)
    assert report.weight_gap < 0.02 and report.mean_gap < 0.5, report
    assert abs(report.log_likelihood_gap) < 0.02, report


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_records_far_from_the_origin_keep_their_covariances(covariance_type):
    """A stream around 1e6 with unit spread gives the covariance of the centred data."""
    rng = np.random.default_rng(3)
    X = 1e6 + rng.normal(size=(20_000, 2)) * [1.0, 2.0]
    model = se.OnlineGMM(1, covariance_type=covariance_type, batch_size=100, warmup=500, seed=0)
    model.learn_many(pd.DataFrame(X, columns=["u", "v"]))
    expected = {
        "full": [[1.0, 0.0], [0.0, 4.0]],
        "tied": [[1.0, 0.0], [0.0, 4.0]],
        "diag": [1.0, 4.0],
        "spherical": 2.5,
    }
    np.testing.assert_allclose(np.squeeze(model.covariances_), expected[covariance_type], atol=0.15)
    np.testing.assert_allclose(model.means_[0], X.mean(axis=0), atol=0.05)


def test_step_floor_tracks_an_abrupt_change_of_weights():
    """With eta_min=0.05 and 50-record batches, weights 0.8/0.2 -> 0.2/0.8 are followed within
    0.05 in at most 3,000 records (about 3 memories of 1 / eta_min = 20 mini-batches)."""
    rng = np.random.default_rng(4)
    means, scales = np.array([[0.0, 0.0], [6.0, 6.0]]), np.ones((2, 2))
    before, _ = _mixture(10_000, rng, [0.8, 0.2], means, scales)
    after, _ = _mixture(6_000, rng, [0.2, 0.8], means, scales)
    model = se.OnlineGMM(2, batch_size=50, warmup=500, step=StepSize(eta_min=0.05), seed=0)
    model.learn_many(pd.DataFrame(before, columns=["x", "y"]))
    near_origin = int(np.argmin(np.linalg.norm(model.means_, axis=1)))
    assert model.weights_[near_origin] == pytest.approx(0.8, abs=0.05)
    followed_after = None
    for start in range(0, len(after), 50):
        model.learn_many(pd.DataFrame(after[start : start + 50], columns=["x", "y"]))
        if abs(model.weights_[near_origin] - 0.2) < 0.05:
            followed_after = start + 50
            break
    assert followed_after is not None and followed_after <= 3000, followed_after


def test_without_a_floor_the_model_keeps_its_long_memory():
    """With no step floor, 2,000 records after the same change the weights have moved far less."""
    rng = np.random.default_rng(4)
    means, scales = np.array([[0.0, 0.0], [6.0, 6.0]]), np.ones((2, 2))
    before, _ = _mixture(10_000, rng, [0.8, 0.2], means, scales)
    after, _ = _mixture(2_000, rng, [0.2, 0.8], means, scales)
    model = se.OnlineGMM(2, batch_size=50, warmup=500, seed=0)
    model.learn_many(pd.DataFrame(np.vstack([before, after]), columns=["x", "y"]))
    near_origin = int(np.argmin(np.linalg.norm(model.means_, axis=1)))
    assert model.weights_[near_origin] > 0.4


def test_a_component_that_dies_stays_finite_and_can_return():
    """When one cluster stops, its weight falls to the floor with finite parameters; it comes back."""
    rng = np.random.default_rng(5)
    means, scales = np.array([[0.0], [10.0]]), np.ones((2, 1))
    both, _ = _mixture(3_000, rng, [0.5, 0.5], means, scales)
    only_first, _ = _mixture(40_000, rng, [1.0, 0.0], means, scales)
    model = se.OnlineGMM(2, batch_size=20, warmup=500, step=StepSize(eta_min=0.2), seed=0)
    model.learn_many(pd.DataFrame(np.vstack([both, only_first]), columns=["x"]))
    far = int(np.argmax(model.means_[:, 0]))
    assert model.weights_[far] < 1e-6
    for value in (model.weights_, model.means_, model.covariances_):
        assert np.all(np.isfinite(value))
    assert model.means_[far, 0] == pytest.approx(10.0, abs=0.5)
    model.learn_many(pd.DataFrame(_mixture(2_000, rng, [0.5, 0.5], means, scales)[0], columns=["x"]))
    assert model.weights_[far] == pytest.approx(0.5, abs=0.1)


def test_polyak_averaging_estimates_as_well_as_plain_steps():
    """With averaging, the means land closer to batch EM's on the same records than the same steps without."""
    rng = np.random.default_rng(6)
    X, _ = _mixture(30_000, rng, [0.5, 0.5], np.array([[0.0], [5.0]]), np.ones((2, 1)))
    batch = np.sort(se.GaussianMixture(2, random_state=0).fit(X).means_[:, 0])
    gaps = {}
    for averaging in (20, None):
        model = se.OnlineGMM(2, batch_size=50, warmup=500, averaging=averaging, step=StepSize(alpha=0.6), seed=0)
        model.learn_many(pd.DataFrame(X, columns=["x"]))
        np.testing.assert_allclose(np.sort(model.means_[:, 0]), [0.0, 5.0], atol=0.05)
        gaps[averaging] = np.abs(np.sort(model.means_[:, 0]) - batch).max()
    # measured on seeds 6-9: 0.0016-0.0034 averaged against 0.009-0.022 plain
    assert gaps[20] < 0.5 * gaps[None], gaps


def test_missing_or_extra_feature_is_named_and_changes_nothing():
    """After the features are fixed, a missing or an extra feature raises ValueError naming it."""
    model = se.OnlineGMM(2, warmup=10, batch_size=5, seed=0)
    for i in range(12):
        model.learn_one({"a": float(i), "b": float(i % 3)})
    before = json.dumps(model.to_dict())
    with pytest.raises(ValueError, match="feature 'b' is missing"):
        model.learn_one({"a": 1.0})
    with pytest.raises(ValueError, match="unexpected feature 'c'"):
        model.learn_one({"a": 1.0, "b": 2.0, "c": 3.0})
    with pytest.raises(ValueError, match="feature 'b' is missing"):
        model.predict_one({"a": 1.0})
    assert json.dumps(model.to_dict()) == before


def test_features_argument_fixes_the_order():
    """features=(...) fixes the column order of means_ whatever the order of the record's keys."""
    model = se.OnlineGMM(1, warmup=10, batch_size=5, features=("y", "x"), seed=0)
    for i in range(10):
        model.learn_one({"x": 100.0 + i % 2, "y": -5.0})
    np.testing.assert_allclose(model.means_[0], [-5.0, 100.5])


def test_works_inside_a_river_pipeline_with_a_scaler():
    """StandardScaler() | OnlineGMM(...) learns and predicts through River's pipeline."""
    rng = np.random.default_rng(7)
    X, labels = _mixture(4000, rng, [0.5, 0.5], np.array([[0.0, 100.0], [50.0, 300.0]]), np.array([[1.0, 10.0]] * 2))
    pipeline = preprocessing.StandardScaler() | se.OnlineGMM(2, warmup=200, batch_size=50, seed=0)
    for row in X:
        pipeline.learn_one({"u": row[0], "v": row[1]})
    predicted = np.array([pipeline.predict_one({"u": row[0], "v": row[1]}) for row in X[-500:]])
    agreement = max(np.mean(predicted == labels[-500:]), np.mean(predicted != labels[-500:]))
    assert agreement > 0.99


def test_frame_values_whose_sum_overflows_are_still_finite_values():
    """A DataFrame of finite values near 1e308 (their sum is inf) is not refused as non-finite: the
    too-large rule screens them, while a NaN in a frame still names its row and column."""
    model = se.OnlineGMM(1, warmup=10, batch_size=5, features=("a", "b"), seed=0)
    screen = model.screen_many(pd.DataFrame({"a": [1e308, 1e308, 1.0], "b": [0.0, 0.0, 0.0]}))
    assert screen.outlier.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="feature 'b' is NaN in row"):
        model.learn_many(pd.DataFrame({"a": [1.0, 2.0], "b": [0.0, np.nan]}, index=[6, 7]))


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("missing", [False, True])
def test_provisional_parameters_are_the_closed_form_of_the_buffer(covariance_type, missing):
    """A cold model's provisional parameters: means the first K buffered rows (missing values: the
    column means), every component the rows' per-feature variance, precision Cholesky 1/sqrt(variance)."""
    from scipy import stats

    K, d = 3, 4
    rng = np.random.default_rng(7)
    rule = "marginalize" if missing else "error"
    model = se.OnlineGMM(K, covariance_type=covariance_type, warmup=100, features=tuple("abcd"), missing=rule)
    for n in (1, 2, 5, 37):
        rows = rng.normal(size=(n, d)) * [1.0, 3.0, 0.1, 10.0] + [0.0, 5.0, -2.0, 1e3]
        if missing:
            rows[1:][rng.random((n - 1, d)) < 0.2] = np.nan  # the first row complete: no column all missing
        params = model._provisional_params(rows)
        observed = [column[~np.isnan(column)] for column in rows.T]
        centre = np.array([column.mean() if column.size else 0.0 for column in observed])
        means = np.where(np.isnan(rows[np.arange(K) % n]), centre, rows[np.arange(K) % n])
        variance = np.array([column.var() if n > 1 and column.size else 1.0 for column in observed])
        variance = np.where(variance > 0, variance, 1.0)
        np.testing.assert_allclose(params.means, means, rtol=1e-15)
        np.testing.assert_allclose(params.weights, np.full(K, 1.0 / K), rtol=1e-15)
        if covariance_type == "spherical":
            variance = np.full(d, variance.mean())
        expected_chol = np.sqrt(1.0 / variance)
        chol = params.precisions_cholesky
        if covariance_type in ("full", "tied"):
            stack = chol.reshape(-1, d, d)
            assert np.all(stack[:, ~np.eye(d, dtype=bool)] == 0.0)
            chol = np.diagonal(stack, axis1=1, axis2=2)
        np.testing.assert_allclose(chol, np.broadcast_to(expected_chol, chol.shape[:-1] + (d,))[..., : chol.shape[-1]]
                                   if chol.ndim > 1 else np.full(K, expected_chol[0]), rtol=1e-14)
        x = rng.normal(size=(5, d))
        log_pdf = np.array([stats.norm.logpdf(x, m, np.sqrt(variance)).sum(axis=1) for m in means]).T
        logp = model._gaussian.log_prob(model._gaussian.prepare(x, params.weights @ params.means), params)
        np.testing.assert_allclose(logp, log_pdf, rtol=1e-10)
