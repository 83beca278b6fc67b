"""One contract, every online estimator: River's checks, mini-batch equivalence, state, bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
from river import checks
from scipy.special import softmax
from scipy.stats import norm

import streamem as se
from streamem.state import StateError

ESTIMATORS = [
    pytest.param(cls, params, id=f"{cls.__name__}-{i}")
    for cls in (se.OnlineGMM, se.OnlineRegressionMixture)
    for i, params in enumerate(cls._unit_test_params())
]


def _stream(n: int, seed: int = 0):
    """Records {a, b, c} from two clusters, with a target from two regression lines."""
    rng = np.random.default_rng(seed)
    side = rng.random(n) < 0.4
    X = np.where(side[:, None], [0.0, 0.0, 0.0], [6.0, 3.0, -2.0]) + rng.normal(size=(n, 3))
    y = np.where(side, X @ [1.0, 0.5, 0.0] + 1.0, X @ [-1.0, 0.0, 2.0] - 3.0) + rng.normal(0, 0.3, n)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    return frame, pd.Series(y)


def _learn(model, x, y):
    if isinstance(model, se.OnlineGMM):
        model.learn_one(x)
    else:
        model.learn_one(x, y)


def _learn_many(model, X, y):
    if isinstance(model, se.OnlineGMM):
        model.learn_many(X)
    else:
        model.learn_many(X, y)


def _answers(model, X, y) -> list:
    if isinstance(model, se.OnlineGMM):
        return [model.predict_proba_one(x) for x in X.to_dict("records")]
    return [(model.predict_one(x), model.predict_proba_one(x, t)) for x, t in zip(X.to_dict("records"), y)]


def _same(a, b, tol=1e-9):
    if isinstance(a, dict):
        return all(math.isclose(a[k], b[k], rel_tol=tol, abs_tol=tol) for k in a)
    if isinstance(a, tuple):
        return all(_same(u, v, tol) for u, v in zip(a, b))
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
def test_river_check_estimator_passes(cls, params):
    """river.checks.check_estimator passes with no check skipped."""
    model = cls(**params)
    assert not model._unit_test_skips()
    checks.check_estimator(model)


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
def test_learn_many_gives_the_model_learn_one_gives(cls, params):
    """learn_many over uneven chunks gives the same predictions as a learn_one loop."""
    X, y = _stream(300)
    one, many = cls(**params), cls(**params)
    for x, t in zip(X.to_dict("records"), y):
        _learn(one, x, t)
    for start, stop in [(0, 7), (7, 100), (100, 101), (101, 300)]:
        _learn_many(many, X.iloc[start:stop], y.iloc[start:stop])
    assert one.n_seen == many.n_seen == 300
    for a, b in zip(_answers(one, X[:50], y[:50]), _answers(many, X[:50], y[:50])):
        assert _same(a, b)


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
def test_predict_many_matches_predict_one(cls, params):
    """predict_many on a DataFrame equals predict_one row by row, during the warm-up (learning between) and after."""
    X, y = _stream(200)
    model = cls(**params)
    for start, stop in [(0, 5), (5, 12), (12, 200)]:  # two stops inside every warm-up, then warm
        _learn_many(model, X.iloc[start:stop], y.iloc[start:stop])
        assert model.is_warm == (stop == 200)
        many = model.predict_many(X[:40]).tolist()
        one = [model.predict_one(x) for x in X[:40].to_dict("records")]
        for a, b in zip(many, one):
            assert _same(float(a), float(b))
        if isinstance(model, se.OnlineGMM):  # labels hide a changed variance: compare responsibilities too
            proba_many = model.predict_proba_many(X[:40]).to_dict("records")
            for a, x in zip(proba_many, X[:40].to_dict("records")):
                assert _same(model.predict_proba_one(x), a)


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
@pytest.mark.parametrize("stop_after", [0, 5, 23, 150])
def test_state_round_trip_mid_stream_continues_identically(cls, params, stop_after):
    """Saving to JSON at any point (even mid-warm-up) and continuing equals never stopping."""
    X, y = _stream(400)
    records = list(zip(X.to_dict("records"), y))
    uninterrupted, interrupted = cls(**params), cls(**params)
    for x, t in records:
        _learn(uninterrupted, x, t)
    for x, t in records[:stop_after]:
        _learn(interrupted, x, t)
    restored = cls.from_dict(json.dumps(interrupted.to_dict()))
    for x, t in records[stop_after:]:
        _learn(restored, x, t)
    assert restored.to_dict() == uninterrupted.to_dict()
    for a, b in zip(_answers(restored, X[:30], y[:30]), _answers(uninterrupted, X[:30], y[:30])):
        assert _same(a, b, tol=0)


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
def test_tampered_state_is_refused_with_a_clear_error(cls, params):
    """Wrong version, format, field, shape or a non-finite number gives StateError, never a model."""
    X, y = _stream(100)
    model = cls(**params)
    _learn_many(model, X, y)
    good = model.to_dict()
    stats_field = next(iter(k for k in good["engine"]["stats"] if k != "shift"))
    tamperings = {
        "version 99": lambda d: d.update(version=99),
        "other format": lambda d: d.update(format="streamem.Other"),
        "unknown field": lambda d: d.update(code="__import__('os')"),
        "missing field": lambda d: d.pop("n_seen"),
        "wrong shape": lambda d: d["engine"]["stats"].update({stats_field: [1.0]}),
        "not JSON": None,
    }
    for name, tamper in tamperings.items():
        if tamper is None:
            document = json.dumps(good)[:-10]
        else:
            document = copy.deepcopy(good)
            tamper(document)
        with pytest.raises(StateError):
            cls.from_dict(document)
        del name
    text = json.dumps(good).replace(json.dumps(good["engine"]["n_updates"]), "NaN", 1)
    with pytest.raises(StateError):
        cls.from_dict(text)


BAD_RECORDS = [
    ({"a": float("nan"), "b": 1.0, "c": 2.0}, ValueError, "feature 'a' is NaN"),
    ({"a": 1.0, "b": float("inf"), "c": 2.0}, ValueError, "feature 'b' is infinite"),
    ({"a": 1.0, "b": "2.0", "c": 2.0}, TypeError, "feature 'b' is not a number"),
    ({"a": 1.0, "b": None, "c": 2.0}, TypeError, "feature 'b' is not a number"),
    (["a", "b"], TypeError, "must be a dict"),
]


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
@pytest.mark.parametrize(("record", "error", "message"), BAD_RECORDS)
def test_bad_record_raises_and_leaves_the_model_unchanged(cls, params, record, error, message):
    """NaN, inf, strings, None or a non-dict raise an error naming the feature; the state is untouched.
    (With missing="marginalize", a None or NaN feature is a missing value, learned instead.)"""
    X, y = _stream(60)
    model = cls(**params)
    _learn_many(model, X, y)
    before = json.dumps(model.to_dict())
    marks_missing = isinstance(record, dict) and any(v is None or v != v for v in record.values())
    if params.get("missing") == "marginalize" and marks_missing:
        _learn(model, record, 1.0)
        assert model.n_seen == 61
        return
    with pytest.raises(error, match=message):
        _learn(model, record, 1.0)
    assert json.dumps(model.to_dict()) == before


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
def test_bad_dataframe_row_names_its_row_and_changes_nothing(cls, params):
    """A NaN or string inside learn_many's DataFrame names the feature and row; nothing is learned."""
    X, y = _stream(60)
    model = cls(**params)
    before = json.dumps(model.to_dict())
    bad = X.copy()
    bad.loc[17, "b"] = np.inf
    with pytest.raises(ValueError, match="feature 'b' is infinite in row 17"):
        _learn_many(model, bad, y)
    stringy = X.astype(object)
    stringy.loc[3, "c"] = "oops"
    with pytest.raises(TypeError, match="feature 'c' is not a number in row 3"):
        _learn_many(model, stringy, y)
    assert json.dumps(model.to_dict()) == before


def _provisional_gmm_proba(seen: np.ndarray, probes: np.ndarray, K: int) -> np.ndarray:
    """Responsibilities (n_probes, K) of the documented provisional model, computed with scipy.

    Means are the first K records seen (cycling if fewer), every component has the
    seen records' per-feature variance (1 if fewer than two records) and weight 1/K.
    """
    means = seen[np.arange(K) % len(seen)]
    variance = seen.var(axis=0) if len(seen) > 1 else np.ones(seen.shape[1])
    log_density = norm.logpdf(probes[:, None, :], means[None], np.sqrt(variance)).sum(axis=2)
    return softmax(log_density + np.log(1.0 / K), axis=1)


@pytest.mark.parametrize(("cls", "params"), ESTIMATORS)
def test_predictions_before_and_during_warm_up(cls, params):
    """Before any record and after each warm-up record, predictions are the documented provisional model's."""
    X, y = _stream(100, seed=4)
    probes, K = X.iloc[40:80], params["n_components"]
    model = cls(**params)
    first = probes.iloc[0].to_dict()
    if isinstance(model, se.OnlineGMM):  # nothing seen: K identical standard normals at the origin
        assert model.predict_one(first) == 0
        assert model.predict_proba_one(first) == pytest.approx(dict.fromkeys(range(K), 1.0 / K))
    else:  # nothing seen: documented as 0
        assert model.predict_one(first) == 0.0
    labels_used = set()
    for n in range(1, params["warmup"]):
        _learn(model, X.iloc[n - 1].to_dict(), y.iloc[n - 1])
        assert not model.is_warm
        if isinstance(model, se.OnlineGMM):
            expected = _provisional_gmm_proba(X.to_numpy()[:n], probes.to_numpy(), K)
            for x, reference in zip(probes.to_dict("records"), expected):
                proba = model.predict_proba_one(x)
                np.testing.assert_allclose([proba[k] for k in range(K)], reference, rtol=1e-9, atol=1e-12)
                assert model.predict_one(x) == int(np.argmax(reference))
                labels_used.add(model.predict_one(x))
        else:  # the provisional prediction is the mean of the targets seen, whatever x is
            for x, t in zip(probes.to_dict("records"), y.iloc[40:80]):
                assert model.predict_one(x) == pytest.approx(y.iloc[:n].mean(), rel=1e-12)
                assert model.predict_proba_one(x, t) == pytest.approx(dict.fromkeys(range(K), 1.0 / K))
    if isinstance(model, se.OnlineGMM):  # two far-apart clusters: the probes are not all given one label
        assert len(labels_used) >= 2
    _learn(model, X.iloc[params["warmup"] - 1].to_dict(), y.iloc[params["warmup"] - 1])
    assert model.is_warm
