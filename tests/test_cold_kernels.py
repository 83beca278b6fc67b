"""A cold model's compiled answers (`families/cold_kernels.py`) against scipy's densities and the
general NumPy path they stand in for."""

from __future__ import annotations

import copy

import numpy as np
import orjson
import pandas as pd
import pytest
from river import base as river_base
from scipy import stats
from scipy.special import logsumexp

import streamem as se
from streamem import outliers
from streamem.families import cold_kernels
from streamem.families.cold_kernels import provisional_scores, robust_distances
from streamem.schedules import StepSize


def _scipy_answer(buffered: np.ndarray, rows: np.ndarray, K: int, spherical: bool):
    """(log-likelihood, responsibilities) under the documented provisional mixture, with scipy."""
    d = rows.shape[1]
    if len(buffered):
        means = buffered[np.arange(K) % len(buffered)]
    else:
        means = np.zeros((K, d))
    variance = buffered.var(axis=0) if len(buffered) > 1 else np.ones(d)
    variance = np.where(variance > 0, variance, 1.0)
    if spherical:
        variance = np.full(d, variance.mean())
    log_density = np.array([stats.norm.logpdf(rows, m, np.sqrt(variance)).sum(axis=1) for m in means]).T
    weighted = log_density + np.log(1.0 / K)
    log_likelihood = logsumexp(weighted, axis=1)
    return log_likelihood, np.exp(weighted - log_likelihood[:, None])


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 300])
def test_provisional_scores_are_the_closed_form_mixture(count, spherical):
    rng = np.random.default_rng(count)
    K, d = 3, 4
    buffer = np.zeros((500, d))
    buffer[:count] = rng.normal(size=(count, d)) * [1.0, 3.0, 0.1, 10.0] + [0.0, 5.0, -2.0, 1e3]
    buffer[:count, 2] = buffer[0, 2] if count else 0.0  # a constant feature: variance 0 counts as 1
    rows = rng.normal(size=(6, d)) * 2 + [0.0, 5.0, -2.0, 1e3]
    log_likelihood, log_resp, finite = provisional_scores(buffer, count, rows, K, spherical)
    expected_ll, expected_resp = _scipy_answer(buffer[:count], rows, K, spherical)
    assert finite
    np.testing.assert_allclose(log_likelihood, expected_ll, rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_resp), expected_resp, rtol=1e-9, atol=1e-15)


def test_provisional_scores_say_when_the_variance_is_not_finite():
    """A variance that overflows, or a NaN in the buffer, sends the caller to the general path."""
    buffer = np.array([[1e200, 0.0], [-1e200, 1.0]])
    assert not provisional_scores(buffer, 2, np.zeros((1, 2)), 2, False)[2]
    buffer = np.array([[0.0, 0.0], [1.0, 1.0], [np.nan, 2.0]])
    assert not provisional_scores(buffer, 3, np.zeros((1, 2)), 2, False)[2]


def test_robust_distances_equal_the_numpy_rule():
    rng = np.random.default_rng(3)
    reference = outliers.robust_reference(rng.normal(size=(40, 3)) * [1.0, 5.0, 0.2])
    rows = rng.normal(size=(50, 3)) * 4
    rows[3, 1] = np.nan  # a missing value counts 0
    distance, blame = robust_distances(rows, *reference)
    expected_distance, expected_blame = outliers.robust_distance(rows, reference)
    np.testing.assert_allclose(distance, expected_distance, rtol=1e-14)
    np.testing.assert_array_equal(blame, expected_blame)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_a_cold_models_fast_answer_equals_the_general_path(covariance_type):
    """`assign_and_screen_many` of a cold model (compiled) agrees with the general NumPy path through
    the whole warm-up: the family's E-step under `_provisional_params`, and the warm-up screen of the
    rows after those buffered (`outliers.screen_warm_up`, the warm-up reference from 20 records on)."""
    rng = np.random.default_rng(11)
    model = se.OnlineGMM(2, covariance_type=covariance_type, warmup=60, features=("a", "b"), outliers="skip")
    model.learn_many(pd.DataFrame(rng.normal(size=(1, 2)), columns=["a", "b"]))
    refused = 0
    for _ in range(57):
        X = pd.DataFrame(rng.normal(size=(1, 2)) * [1.0, 20.0], columns=["a", "b"])
        X.iloc[0, 1] += 1e6 * (rng.random() < 0.1)  # now and then an outlier for the warm-up screen
        resp, log_likelihood, screen = model.assign_and_screen_many(X)
        rows, buffered = X.to_numpy(), model._buffer[: model._count]
        params = model._provisional_params(buffered)
        family = model._gaussian
        expected_ll, expected_log_resp = family.e_step(family.prepare(rows, params.weights @ params.means), params)
        np.testing.assert_allclose(log_likelihood, expected_ll, rtol=1e-12)
        np.testing.assert_allclose(resp, np.exp(expected_log_resp), rtol=1e-9, atol=1e-15)
        expected = outliers.screen_warm_up(rows, ("a", "b"), buffered, model.outlier_threshold)
        np.testing.assert_allclose(screen.distance, expected.distance, rtol=1e-12)
        assert screen.outlier.tolist() == expected.outlier.tolist()
        refused += int(screen.outlier.sum())
        model.learn_many(X)
    assert not model.is_warm and refused > 0


def test_step_size_to_dict_is_rivers_params():
    step = StepSize(alpha=0.7, t0=3.0, eta_min=0.01)
    assert step.to_dict() == river_base.Base._get_params(step)
    assert StepSize(**step.to_dict()).to_dict() == step.to_dict()


def _state(model) -> tuple:
    """The model's document, and the book-keeping it does not hold (what the refusal window and the
    warm-up report count on)."""
    refused = [(i, call, position, row.tolist()) for i, (call, position, row) in model._refused]
    document = orjson.dumps(model.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY)
    return document, model._screened, model._calls, list(model._origins), refused, model._moved


@pytest.mark.parametrize(
    "covariance_type, outlier_mode, threshold",
    [
        ("full", "skip", outliers.DEFAULT_THRESHOLD),
        ("spherical", "skip", 50.0),
        ("diag", "learn", None),
        ("full", "raise", outliers.DEFAULT_THRESHOLD),
    ],
)
def test_assign_and_learn_many_is_assign_and_screen_then_learn_many(
    covariance_type, outlier_mode, threshold, monkeypatch
):
    """Through a whole warm-up and beyond, in batches of 1-4 rows with outliers now and then: the same
    answers, screens, refusals and state as `assign_and_screen_many` then `learn_many` on a twin, and
    most of the cold batches take the one compiled call."""
    compiled = []
    monkeypatch.setattr(
        se.online_gmm, "cold_answers_each", lambda *a: compiled.append(1) or cold_kernels.cold_answers_each(*a)
    )
    rng = np.random.default_rng(5)
    model = se.OnlineGMM(
        2,
        covariance_type=covariance_type,
        warmup=80,
        batch_size=8,
        features=("a", "b"),
        seed=0,
        outliers=outlier_mode,
        outlier_threshold=threshold,
    )
    twin = copy.deepcopy(model)
    cold_calls = refused = 0
    while model.n_seen < 140:
        size = int(rng.integers(1, 5))
        if outlier_mode != "raise" and model.n_seen < outliers.MIN_REFERENCE < model.n_seen + size:
            size = outliers.MIN_REFERENCE - model.n_seen  # a batch that completes the first 20 (else one past them)
        X = rng.normal(size=(size, 2)) * [1.0, 20.0] + [0.0, 3.0]
        if rng.random() < 0.08:
            X[0, 1] += 1e6  # beyond any threshold: the warm-up screen refuses it once it has a reference
        cold_calls += not model.is_warm
        answer = model.assign_and_learn_many(X)
        expected = twin.assign_and_screen_many(X)
        if not expected[-1].outlier.any():
            twin.learn_many(X)
        refused += int(expected[-1].outlier.sum())
        if outlier_mode == "skip" and expected[-1].outlier.any():
            # offered anyway, as the Kafka consumer offers refused rows: the refusal window fills, and
            # later batches take the fast path only where learn_many's spans would be the same
            model.learn_many(X[expected[-1].outlier])
            twin.learn_many(X[expected[-1].outlier])
        for got, want in zip(answer[:2], expected[:2], strict=True):
            np.testing.assert_array_equal(got, want)
        for field in ("distance", "outlier", "what", "blame", "threshold", "names"):
            np.testing.assert_array_equal(getattr(answer[-1], field), getattr(expected[-1], field))
        assert _state(model) == _state(twin)
        assert [(i, str(e)) for i, e in model.skipped_] == [(i, str(e)) for i, e in twin.skipped_]
        assert (model.n_outliers, model.warmup_needed) == (twin.n_outliers, twin.warmup_needed)
    assert model.is_warm and (refused > 0) == (threshold is not None)
    assert len(compiled) > cold_calls / 2


def test_assign_and_learn_many_takes_the_general_path_for_what_the_compiled_call_cannot():
    """A row with a value missing is refused as by learn_many (nothing learned); a regression mixture
    (no compiled call) answers then learns as assign_and_screen_many then learn_many."""
    model = se.OnlineGMM(2, features=("a", "b"), warmup=50)
    model.assign_and_learn_many(np.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN|missing|finite"):
        model.assign_and_learn_many(np.array([[1.0, np.nan]]))
    assert model.n_seen == 3
    rng = np.random.default_rng(2)
    regression = se.OnlineRegressionMixture(2, warmup=40, batch_size=10, seed=0)
    regression.add_features(["a"])
    twin = copy.deepcopy(regression)
    for _ in range(30):
        X = rng.normal(size=(3, 1))
        y = 2.0 * X[:, 0] + rng.normal(size=3)
        answer = regression.assign_and_learn_many(X, y)
        expected = twin.assign_and_screen_many(X, y)
        if not expected[-1].outlier.any():
            twin.learn_many(X, y)
        for got, want in zip(answer[:3], expected[:3], strict=True):
            np.testing.assert_array_equal(got, want)
        assert _state(regression) == _state(twin)
    assert regression.is_warm


def test_assign_and_learn_each_is_assign_and_learn_many_model_by_model(monkeypatch):
    """Rounds of batches of 1-3 rows for 20 of 30 cold mixtures (two of them spherical, some with another
    threshold), outliers now and then, through their warm-ups: the same answers,
    screens and states as `assign_and_learn_many` model by model on twins, and most batches in the
    compiled call for all."""
    calls = []
    monkeypatch.setattr(
        se.online_gmm, "cold_answers_each", lambda *a: calls.append(len(a[3]) - 1) or cold_kernels.cold_answers_each(*a)
    )
    rng = np.random.default_rng(9)

    def make(i):
        if i < 2:
            return se.OnlineGMM(2, covariance_type="spherical", warmup=40, batch_size=8, features=("a", "b"), seed=i)
        threshold = 50.0 if i % 5 == 0 else outliers.DEFAULT_THRESHOLD
        return se.OnlineGMM(2, warmup=40, batch_size=8, features=("a", "b"), seed=i, outlier_threshold=threshold)

    models = [make(i) for i in range(30)]
    twins = copy.deepcopy(models)
    for _ in range(70):  # warm-ups of 40 rows, a model's batch in about 3 rounds of 5
        chosen = [i for i in rng.permutation(30)[:20] if rng.random() < 0.9]
        sizes = rng.integers(1, 4, size=len(chosen))
        X = rng.normal(size=(int(sizes.sum()), 2)) * [1.0, 5.0] + [2.0, 0.0]
        X[rng.random(len(X)) < 0.03, 0] += 1e5
        bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        resp, log_likelihood, predictions, screens = se.OnlineGMM.assign_and_learn_each(
            [models[i] for i in chosen], X, bounds
        )
        assert predictions is None
        for g, i in enumerate(chosen):
            a, b = bounds[g], bounds[g + 1]
            want = twins[i].assign_and_learn_many(X[a:b])
            np.testing.assert_array_equal(resp[a:b], want[0])
            np.testing.assert_array_equal(log_likelihood[a:b], want[1])
            assert (screens[g] is None) == (not want[2].outlier.any())
            if screens[g] is not None:
                for field in ("distance", "outlier", "what", "blame", "threshold", "names"):
                    np.testing.assert_array_equal(getattr(screens[g], field), getattr(want[2], field))
        for model, twin in zip(models, twins, strict=True):
            assert _state(model) == _state(twin)
    assert all(model.is_warm for model in models[2:])
    assert sum(calls) > 300  # model batches answered by the compiled call for all


def test_assign_and_learn_each_refuses_a_model_twice_and_stops_at_a_bad_row():
    """A model given twice, no model, or models of different n_components: ValueError; a row with a value
    missing stops the call at its model, those before it having learned and those after untouched."""
    models = [se.OnlineGMM(2, features=("a", "b"), warmup=50) for _ in range(3)]
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match="twice"):
        se.OnlineGMM.assign_and_learn_each([models[0], models[0]], X[:2], [0, 1, 2])
    with pytest.raises(ValueError, match="at least one"):
        se.OnlineGMM.assign_and_learn_each([], X[:0], [0])
    with pytest.raises(ValueError, match="one n_components"):
        se.OnlineGMM.assign_and_learn_each([models[0], se.OnlineGMM(3, features=("a", "b"))], X[:2], [0, 1, 2])
    X[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN|missing|finite"):
        se.OnlineGMM.assign_and_learn_each(models, X, [0, 1, 2, 3])
    assert [model.n_seen for model in models] == [1, 0, 0]  # those before the bad row learned, the others not
