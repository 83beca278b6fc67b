"""OnlineMarkovSwitchingRegression: River's contract, the one-step forecast, state round trips, and agreement
with batch Baum-Welch."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pandas as pd
import pytest
from river import checks
from scipy.special import logsumexp
from scipy.stats import norm

import streamem as se
from streamem.state import StateError

# two regimes whose lines cross near x = 2: x alone says little about the regime, the past says a lot
COEF = np.array([[1.0], [-1.0]])
INTERCEPT = np.array([0.0, 4.0])


def regime_stream(n: int, coef: np.ndarray, intercept: np.ndarray, noise: float, stay: float, seed: int):
    """(X (n, d), y (n,), states (n,)) of a chain that stays in its regime with probability `stay`;
    y = coef[state] . x + intercept[state] + noise * N(0, 1), x ~ N(2, 1) in every column."""
    rng = np.random.default_rng(seed)
    K, d = coef.shape
    states = np.empty(n, dtype=np.int64)
    state = 0
    leave, jumps = rng.random(n) > stay, rng.integers(1, K, n)
    for t in range(n):
        if leave[t]:
            state = (state + jumps[t]) % K
        states[t] = state
    X = rng.normal(2.0, 1.0, size=(n, d))
    y = np.einsum("nd,nd->n", X, coef[states]) + intercept[states] + noise * rng.normal(size=n)
    return X, y, states


def frame(X: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])


def records(X: np.ndarray) -> list[dict]:
    return frame(X).to_dict("records")


@pytest.mark.parametrize("params", list(se.OnlineMarkovSwitchingRegression._unit_test_params()))
def test_river_check_estimator_passes(params):
    """river.checks.check_estimator passes with no check skipped."""
    model = se.OnlineMarkovSwitchingRegression(**params)
    assert not model._unit_test_skips()
    checks.check_estimator(model)


def test_learn_many_gives_the_model_learn_one_gives():
    """learn_many over uneven chunks (through the warm-up and across blocks) equals a learn_one loop."""
    X, y, _ = regime_stream(1500, COEF, INTERCEPT, 0.5, 0.97, seed=0)
    one, many = (se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, seed=0) for _ in range(2))
    for x, target in zip(records(X), y, strict=True):
        one.learn_one(x, target)
    for start, stop in [(0, 7), (7, 299), (299, 301), (301, 400), (400, 1337), (1337, 1500)]:
        many.learn_many(frame(X).iloc[start:stop], pd.Series(y[start:stop]))
    assert one.n_seen == many.n_seen == 1500
    for name in ("transmat_", "startprob_", "coef_", "intercept_", "noise_variance_"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(many.stream_filter(None), one.stream_filter(None), atol=1e-9)
    assert many.predict_one({"f0": 1.5}) == pytest.approx(one.predict_one({"f0": 1.5}), rel=1e-9)


def test_predict_one_is_the_filter_moved_one_step_through_the_lines():
    """predict_one is sum_k (filter @ transmat_)_k (coef_k . x + intercept_k), predict_proba_one / score_one
    weigh that by the normal densities of y (scipy), all from the public attributes; predicting changes
    nothing, and learn_one then makes predict_proba_one's answer the filter."""
    X, y, _ = regime_stream(900, COEF, INTERCEPT, 0.5, 0.97, seed=1)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=50, seed=0)
    model.learn_many(frame(X[:830]), y[:830])
    x, target = {"f0": 2.5}, 1.7
    predicted = model.stream_filter(None) @ model.transmat_
    lines = model.coef_ @ np.array([2.5]) + model.intercept_
    before = json.dumps(model.to_dict())
    assert model.predict_one(x) == pytest.approx(float(predicted @ lines), rel=1e-12)
    assert model.predict_many(frame(np.array([[2.5], [0.0]]))).tolist() == pytest.approx(
        [float(predicted @ lines), float(predicted @ model.intercept_)], rel=1e-12
    )
    joint = np.log(predicted) + norm.logpdf(target, lines, np.sqrt(model.noise_variance_))
    expected = np.exp(joint - logsumexp(joint))
    answer = model.predict_proba_one(x, target)
    np.testing.assert_allclose([answer[k] for k in range(2)], expected, rtol=1e-9)
    assert model.score_one(x, target) == pytest.approx(logsumexp(joint), rel=1e-12)
    assert json.dumps(model.to_dict()) == before
    model.learn_one(x, target)
    np.testing.assert_allclose(model.stream_filter(None), expected, rtol=1e-9)


def test_a_stream_that_has_not_started_forecasts_from_startprob():
    """A stream with no record yet forecasts with startprob_ (filter_and_learn's first answer there)."""
    X, y, _ = regime_stream(400, COEF, INTERCEPT, 0.5, 0.97, seed=2)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, features=("f0",), seed=0)
    model.filter_and_learn(np.column_stack([X, y]), stream="a")
    lines = model.coef_ @ X[0] + model.intercept_
    joint = np.log(model.startprob_) + norm.logpdf(y[0], lines, np.sqrt(model.noise_variance_))
    answers, log_likelihood = model.filter_and_learn(np.column_stack([X[:1], y[:1]]), stream="b")
    np.testing.assert_allclose(answers[0], np.exp(joint - logsumexp(joint)), rtol=1e-9)
    assert log_likelihood[0] == pytest.approx(logsumexp(joint), rel=1e-12)


def test_before_the_warm_up_the_forecast_is_the_mean_target_so_far():
    """Before the warm-up ends, predict_one is the mean of the targets learned (0.0 before any)."""
    model = se.OnlineMarkovSwitchingRegression(2, warmup=50)
    assert model.predict_one({"a": 1.0}) == 0.0
    targets = [3.0, 5.5, -1.0]
    for target in targets:
        model.learn_one({"a": 1.0}, target)
    assert model.predict_one({"a": 1.0}) == pytest.approx(np.mean(targets))
    assert not model.is_warm and model.n_seen == 3


def test_state_round_trip_mid_stream_equals_never_stopping():
    """to_dict -> JSON -> from_dict in the warm-up and mid-block, then going on, gives the same forecasts
    and parameters as a model that never stopped."""
    X, y, _ = regime_stream(1200, COEF, INTERCEPT, 0.5, 0.97, seed=3)
    never = se.OnlineMarkovSwitchingRegression(2, warmup=200, batch_size=64, seed=0)
    restored = se.OnlineMarkovSwitchingRegression(2, warmup=200, batch_size=64, seed=0)
    for t, (x, target) in enumerate(zip(records(X), y, strict=True)):
        if t in (150, 523, 1000):  # in the warm-up, in a block, and again
            restored = se.OnlineMarkovSwitchingRegression.from_dict(json.loads(json.dumps(restored.to_dict())))
        assert restored.predict_one(x) == pytest.approx(never.predict_one(x), rel=1e-12)
        never.learn_one(x, target)
        restored.learn_one(x, target)
    for name in ("transmat_", "coef_", "intercept_", "noise_variance_"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(never, name), err_msg=name)


def test_online_agrees_with_batch_baum_welch_on_a_long_sticky_stream():
    """On 50,000 records of a sticky stream of two well separated lines, the online lines are within 0.05 and
    the transition matrix within 0.01 of batch MarkovSwitchingRegression on the same records (defaults)."""
    coef, intercept = np.array([[1.0], [0.5]]), np.array([0.0, 3.0])  # 2 apart (4 noise sd) at x = 2
    X, y, _ = regime_stream(50_000, coef, intercept, 0.5, 0.98, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        batch = se.MarkovSwitchingRegression(2, random_state=0).fit(X, y)
    truth = np.argsort(batch.intercept_)
    np.testing.assert_allclose(batch.coef_[truth], coef, atol=0.05)  # the reference found the true lines
    online = se.OnlineMarkovSwitchingRegression(2, seed=0)
    online.learn_many(frame(X), y)
    ours = [int(np.argmin(np.abs(online.intercept_ - b))) for b in batch.intercept_]
    assert sorted(ours) == [0, 1]
    np.testing.assert_allclose(online.coef_[ours], batch.coef_, atol=0.05)
    np.testing.assert_allclose(online.intercept_[ours], batch.intercept_, atol=0.05)
    np.testing.assert_allclose(online.noise_variance_[ours], batch.noise_variance_, atol=0.05)
    np.testing.assert_allclose(online.transmat_[np.ix_(ours, ours)], batch.transmat_, atol=0.01)


def test_the_warm_up_finds_lines_that_cross_at_the_centre_of_the_data():
    """Regimes y = x and y = 4 - x with x uniform on [0, 4] (one quantile start stops at two flat lines
    there): after 4,000 records the lines are within 0.05 of the true ones."""
    rng = np.random.default_rng(0)
    states = np.repeat(np.arange(40) % 2, 100)
    x = rng.uniform(0, 4, 4000)
    y = np.where(states == 0, x, 4.0 - x) + rng.normal(0, 0.3, 4000)
    model = se.OnlineMarkovSwitchingRegression(2, seed=0)
    model.learn_many(pd.DataFrame({"x": x}), y)
    order = np.argsort(model.coef_[:, 0])
    np.testing.assert_allclose(model.coef_[order, 0], [-1.0, 1.0], atol=0.05)
    np.testing.assert_allclose(model.intercept_[order], [4.0, 0.0], atol=0.05)


def test_prequential_forecasts_beat_a_regression_mixture_and_near_the_true_filter():
    """Predict-then-learn on a regime stream: the mean squared error of predict_one is under half of
    OnlineRegressionMixture's (which cannot use persistence) and within 2% of the forecasts of the filter
    run with the true parameters (batch predict_mean with max_iter=0)."""
    X, y, _ = regime_stream(20_000, COEF, INTERCEPT, 0.5, 0.98, seed=5)
    truth = se.MarkovSwitchingRegression(
        2,
        max_iter=0,
        startprob_init=[1.0, 0.0],
        transmat_init=[[0.98, 0.02], [0.02, 0.98]],
        coef_init=COEF,
        intercept_init=INTERCEPT,
        noise_variance_init=[0.25, 0.25],
    ).fit(X, y)
    true_forecast = truth.predict_mean(X, y)
    online, mixture = se.OnlineMarkovSwitchingRegression(2, seed=0), se.OnlineRegressionMixture(2, seed=0)
    hmm_forecast, mixture_forecast = np.empty(len(y)), np.empty(len(y))
    for t, (x, target) in enumerate(zip(records(X), y, strict=True)):
        hmm_forecast[t], mixture_forecast[t] = online.predict_one(x), mixture.predict_one(x)
        online.learn_one(x, target)
        mixture.learn_one(x, target)
    scored = slice(2000, None)  # after both warm-ups and a few blocks
    mse = {
        name: float(np.mean((forecast[scored] - y[scored]) ** 2))
        for name, forecast in [("hmm", hmm_forecast), ("mixture", mixture_forecast), ("truth", true_forecast)]
    }
    assert mse["hmm"] < 0.5 * mse["mixture"], mse
    assert mse["hmm"] < 1.02 * mse["truth"], mse


def test_a_new_feature_extends_the_lines_with_a_zero_coefficient():
    """Without features=, a feature first seen mid-stream gets coefficient 0 (the forecast for records
    without it does not move), a feature missing from a record reads 0 (River's linear models), and the
    widened model survives a JSON round trip."""
    X, y, _ = regime_stream(700, COEF, INTERCEPT, 0.5, 0.97, seed=6)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, seed=0)
    model.learn_many(frame(X[:650]), y[:650])
    forecast = model.predict_one({"f0": 1.0})
    assert model.predict_one({"f0": 1.0, "new": 9.0}) == forecast  # predicting learns no feature
    model.learn_one({"f0": X[650, 0], "new": 0.0}, y[650])
    assert model.features_ == ("f0", "new")
    np.testing.assert_array_equal(model.coef_[:, 1], [0.0, 0.0])
    predicted = model.stream_filter(None) @ model.transmat_
    assert model.predict_one({"f0": 1.0}) == pytest.approx(float(predicted @ (model.coef_[:, 0] + model.intercept_)))
    only_new = float(predicted @ (2.0 * model.coef_[:, 1] + model.intercept_))
    assert model.predict_one({"new": 2.0}) == pytest.approx(only_new)
    restored = se.OnlineMarkovSwitchingRegression.from_dict(json.dumps(model.to_dict()))
    assert restored.features_ == ("f0", "new") and restored.predict_one({"new": 2.0}) == model.predict_one({"new": 2.0})


# -- bad input ---------------------------------------------------------------------------------
BAD_RECORDS = [
    ({"f0": float("nan"), "f1": 0.0}, ValueError, "'f0' is NaN"),
    ({"f0": "fast", "f1": 0.0}, TypeError, "'f0' is not a number"),
    ({"f0": 1.0}, ValueError, "'f1' is missing"),
    ({"f0": 1.0, "f1": 0.0, "f2": 3.0}, ValueError, "unexpected feature 'f2'"),
    ([1.0, 0.0], TypeError, "dict"),
]


@pytest.mark.parametrize(("record", "error", "message"), BAD_RECORDS)
def test_a_bad_record_is_a_clear_error_and_changes_nothing(record, error, message):
    """With features= given, learn_one / predict_one / predict_proba_one / score_one of a bad record raise
    naming the field; parameters, filter and block stay."""
    X, y, _ = regime_stream(700, np.array([[1.0, 0.5], [-1.0, 0.0]]), INTERCEPT, 0.5, 0.97, seed=7)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.learn_many(frame(X), y)
    before = json.dumps(model.to_dict())
    for call in (lambda: model.learn_one(record, 1.0), lambda: model.predict_one(record),
                 lambda: model.predict_proba_one(record, 1.0), lambda: model.score_one(record, 1.0)):
        with pytest.raises(error, match=message):
            call()
    assert json.dumps(model.to_dict()) == before


@pytest.mark.parametrize("features", [("f0",), None])
@pytest.mark.parametrize(
    ("target", "error", "message"),
    [(float("nan"), ValueError, "target is NaN"), ("3.5", TypeError, "target is not a number"),
     (float("inf"), ValueError, "target is infinite"), (None, TypeError, "target is not a number")],
)
def test_a_bad_target_is_a_clear_error_and_changes_nothing(features, target, error, message):
    """learn_one / predict_proba_one / score_one with a bad y raise naming it, and change nothing (in the
    warm-up and after it, with and without features=)."""
    X, y, _ = regime_stream(400, COEF, INTERCEPT, 0.5, 0.97, seed=8)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, features=features, seed=0)
    for start, stop in [(0, 100), (100, 400)]:
        model.learn_many(frame(X[start:stop]), y[start:stop])
        before = json.dumps(model.to_dict())
        for call in (model.learn_one, model.predict_proba_one, model.score_one):
            with pytest.raises(error, match=message):
                call({"f0": 1.0}, target)
        assert json.dumps(model.to_dict()) == before


def test_without_features_a_bad_value_still_raises_and_changes_nothing():
    """Without features=, a NaN or a string in any feature (even a new one) raises naming it, and no
    feature is added."""
    X, y, _ = regime_stream(400, COEF, INTERCEPT, 0.5, 0.97, seed=9)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, seed=0)
    model.learn_many(frame(X), y)
    before = json.dumps(model.to_dict())
    for record, error, message in [({"f0": 1.0, "g": float("nan")}, ValueError, "'g' is NaN"),
                                   ({"f0": "1.0"}, TypeError, "'f0' is not a number")]:
        for call in (lambda r=record: model.learn_one(r, 1.0), lambda r=record: model.predict_one(r)):
            with pytest.raises(error, match=message):
                call()
    assert json.dumps(model.to_dict()) == before and model.features_ == ("f0",)


@pytest.mark.parametrize(
    ("change", "message"),
    [(lambda X, y: (X.assign(f0=X["f0"].where(X.index != 130, np.nan)), y), "'f0' is NaN in row 130"),
     (lambda X, y: (X, y.where(y.index != 130, np.inf)), "target is infinite in row 130"),
     (lambda X, y: (X.drop(columns="f1"), y), "'f1' is missing")],
)
def test_a_bad_frame_is_refused_whole(change, message):
    """learn_many with a bad value in row 130 (or a missing column, with features=) raises naming it and
    learns none of the frame's rows."""
    X, y, _ = regime_stream(700, np.array([[1.0, 0.5], [-1.0, 0.0]]), INTERCEPT, 0.5, 0.97, seed=10)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.learn_many(frame(X[:400]), y[:400])
    before = json.dumps(model.to_dict())
    bad_X, bad_y = change(frame(X[400:]), pd.Series(y[400:]))
    with pytest.raises(ValueError, match=message):
        model.learn_many(bad_X, bad_y)
    assert json.dumps(model.to_dict()) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="streamem.OnlineGaussianHMM"), "format"),
        (lambda d: d["streams"][0].update(filter=[0.5, 0.6]), "filter"),
        (lambda d: d["engine"].update(transmat=[[1.0, 0.0]]), "transmat"),
        (lambda d: d["engine"]["stats"].update(first=[1.0, -1.0]), "negative"),
        (lambda d: d["engine"].update(coef=[[1.0, 2.0], [3.0, 4.0]]), "coef"),
        (lambda d: d["engine"].update(noise_variance=[1.0, -1.0]), "noise_variance"),
        (lambda d: d["engine"].update(intercept=[1.0]), "intercept"),
        (lambda d: d["streams"][0].update(block=[[1.0, "x"]]), "block"),
        (lambda d: d["streams"][0].update(block=[[1.0, 2.0, 3.0]]), "features"),
        (lambda d: d["streams"][0].update(block=[[1.0, 2.0]] * 64), "full block"),
        (lambda d: d["engine"].update(n_updates=float("inf")), "n_updates"),
    ],
)
def test_a_corrupted_state_is_refused_by_name(change, message):
    """from_dict of a damaged document raises StateError naming what is wrong."""
    X, y, _ = regime_stream(700, COEF, INTERCEPT, 0.5, 0.97, seed=11)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, seed=0)
    model.learn_many(frame(X), y)
    document = copy.deepcopy(model.to_dict())
    change(document)
    with pytest.raises(StateError, match=message):
        se.OnlineMarkovSwitchingRegression.from_dict(document)


def test_forecast_and_learn_answers_as_predict_one_then_learn_one():
    """forecast_and_learn (the Kafka consumer's entry) gives each row the forecast, regime probabilities and
    log-density that predict_one / predict_proba_one / score_one gave it just before learn_one, through the
    warm-up and across blocks."""
    X, y, _ = regime_stream(700, COEF, INTERCEPT, 0.5, 0.97, seed=21)
    one = se.OnlineMarkovSwitchingRegression(2, warmup=200, batch_size=32, features=("f0",), seed=0)
    many = se.OnlineMarkovSwitchingRegression(2, warmup=200, batch_size=32, features=("f0",), seed=0)
    expected = []
    for x, target in zip(records(X), y, strict=True):
        proba = one.predict_proba_one(x, target)
        expected.append((one.predict_one(x), [proba[k] for k in range(2)], one.score_one(x, target)))
        one.learn_one(x, target)
    rows = np.column_stack([X, y])
    answers = [many.forecast_and_learn(rows[a:b], stream=None) for a, b in [(0, 150), (150, 230), (230, 700)]]
    probabilities, log_likelihood, forecasts = (np.concatenate(part) for part in zip(*answers, strict=True))
    np.testing.assert_allclose(forecasts, [e[0] for e in expected], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(probabilities[200:], [e[1] for e in expected[200:]], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(log_likelihood[200:], [e[2] for e in expected[200:]], rtol=1e-9)
    assert np.isnan(log_likelihood[:200]).all()
    np.testing.assert_allclose(many.coef_, one.coef_, rtol=1e-12)


@pytest.mark.parametrize("where", ["target", "new feature"])
def test_a_value_too_large_with_a_new_feature_changes_nothing(where):
    """A record bringing a new feature and a value beyond 1e150 (in the target or the new feature) raises and
    leaves the model as it was: the new feature does not join."""
    X, y, _ = regime_stream(300, COEF, INTERCEPT, 0.5, 0.97, seed=22)
    model = se.OnlineMarkovSwitchingRegression(2, warmup=200, batch_size=32, seed=0)
    model.learn_many(frame(X), pd.Series(y))
    before = json.dumps(model.to_dict())
    record, target = ({"f0": 1.0, "z": 1.0}, 1e150) if where == "target" else ({"f0": 1.0, "z": -1e200}, 1.0)
    with pytest.raises(ValueError, match="too large"):
        model.learn_one(record, target)
    with pytest.raises(ValueError, match="too large"):
        model.learn_many(pd.DataFrame([record]), pd.Series([target]))
    assert model.features_ == ("f0",) and json.dumps(model.to_dict()) == before
