"""OnlineGaussianHMM: River's contract, the filter, state round trips, and agreement with batch Baum-Welch."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from river import checks
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import streamem as se
from streamem.state import StateError


def sticky_stream(n: int, means: np.ndarray, stay: float, seed: int, scale: float = 1.0):
    """Records of a chain that stays in its state with probability `stay`, and the states."""
    rng = np.random.default_rng(seed)
    K = len(means)
    states = np.empty(n, dtype=np.int64)
    state = 0
    leave, jumps = rng.random(n) > stay, rng.integers(1, K, n)
    for t in range(n):
        if leave[t]:
            state = (state + jumps[t]) % K
        states[t] = state
    return means[states] + scale * rng.normal(size=(n, means.shape[1])), states


def frame(X: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])


THREE_STATES = np.array([[0.0, 0.0], [2.5, 0.0], [0.0, 2.5]])


@pytest.mark.parametrize("params", list(se.OnlineGaussianHMM._unit_test_params()))
def test_river_check_estimator_passes(params):
    """river.checks.check_estimator passes with no check skipped."""
    model = se.OnlineGaussianHMM(**params)
    assert not model._unit_test_skips()
    checks.check_estimator(model)


def test_learn_many_gives_the_model_learn_one_gives():
    """learn_many over uneven chunks (through the warm-up and across blocks) equals a learn_one loop."""
    X, _ = sticky_stream(1500, THREE_STATES, 0.95, seed=0)
    one, many = (se.OnlineGaussianHMM(3, warmup=300, batch_size=64, seed=0) for _ in range(2))
    for x in frame(X).to_dict("records"):
        one.learn_one(x)
    for start, stop in [(0, 7), (7, 299), (299, 301), (301, 400), (400, 1337), (1337, 1500)]:
        many.learn_many(frame(X).iloc[start:stop])
    assert one.n_seen == many.n_seen == 1500
    np.testing.assert_allclose(many.transmat_, one.transmat_, rtol=1e-9)
    np.testing.assert_allclose(many.means_, one.means_, rtol=1e-9)
    np.testing.assert_allclose(many.filter_, one.filter_, atol=1e-9)


def test_predict_proba_one_is_the_filter_moved_one_step():
    """predict_proba_one / score_one equal the filter pushed through transmat_ and weighed by the
    densities (scipy), computed from the public attributes; learn_one then makes that the filter."""
    X, _ = sticky_stream(900, THREE_STATES, 0.95, seed=1)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=50, seed=0)
    model.learn_many(frame(X[:830]))
    x = {"f0": 2.0, "f1": 0.3}
    densities = np.array(
        [multivariate_normal(model.means_[k], model.covariances_[k]).logpdf([2.0, 0.3]) for k in range(3)]
    )
    joint = np.log(model.filter_ @ model.transmat_) + densities
    expected = np.exp(joint - logsumexp(joint))
    answer = model.predict_proba_one(x)
    np.testing.assert_allclose([answer[k] for k in range(3)], expected, rtol=1e-9)
    assert model.score_one(x) == pytest.approx(logsumexp(joint), rel=1e-12)
    assert model.predict_one(x) == int(np.argmax(expected))
    model.learn_one(x)
    np.testing.assert_allclose(model.filter_, expected, rtol=1e-9)


def test_state_round_trip_mid_stream_equals_never_stopping():
    """to_dict -> JSON -> from_dict in the warm-up and mid-block, then going on, gives the same answers
    and parameters as a model that never stopped."""
    X, _ = sticky_stream(1200, THREE_STATES, 0.95, seed=2)
    records = frame(X).to_dict("records")
    never = se.OnlineGaussianHMM(3, warmup=200, batch_size=64, seed=0)
    restored = se.OnlineGaussianHMM(3, warmup=200, batch_size=64, seed=0)
    for t, x in enumerate(records):
        if t in (150, 523, 968, 1000):  # in the warm-up, in a block, right after one (none open), and again
            restored = se.OnlineGaussianHMM.from_dict(json.loads(json.dumps(restored.to_dict())))
        assert restored.predict_proba_one(x) == pytest.approx(never.predict_proba_one(x), rel=1e-12)
        never.learn_one(x)
        restored.learn_one(x)
    np.testing.assert_array_equal(restored.transmat_, never.transmat_)
    np.testing.assert_array_equal(restored.covariances_, never.covariances_)


def test_state_does_not_grow_with_the_stream():
    """The state holds at most one block of records: its JSON is as long after 20,000 records as after 2,000."""
    X, _ = sticky_stream(20_000, THREE_STATES, 0.95, seed=3)
    model = se.OnlineGaussianHMM(3, seed=0)
    model.learn_many(frame(X[:2000]))
    short = len(json.dumps(model.to_dict()))
    model.learn_many(frame(X[2000:]))
    assert len(json.dumps(model.to_dict())) < 1.2 * short


def test_online_agrees_with_batch_baum_welch_on_a_long_sticky_stream():
    """On 100,000 records of a sticky chain, the online transition matrix is within 0.01 and the means
    within 0.05 of batch Baum-Welch on the same records (default settings)."""
    X, _ = sticky_stream(100_000, THREE_STATES, 0.97, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        batch = se.GaussianHMM(3, random_state=0).fit(X)
    online = se.OnlineGaussianHMM(3, seed=0)
    online.learn_many(frame(X))
    ours = [int(np.argmin(((online.means_ - m) ** 2).sum(axis=1))) for m in batch.means_]
    assert sorted(ours) == [0, 1, 2]
    np.testing.assert_allclose(online.means_[ours], batch.means_, atol=0.05)
    np.testing.assert_allclose(online.transmat_[np.ix_(ours, ours)], batch.transmat_, atol=0.01)


def test_online_filter_labels_regimes_as_the_true_filter_and_switches_less_than_a_mixture():
    """Prequential labels of a regime stream: within 1 point of the filter run with the true parameters,
    and several times fewer switches than OnlineGMM's on the same records."""
    means = np.array([[0.0], [1.6]])
    X, states = sticky_stream(20_000, means, 0.98, seed=5)
    truth = se.GaussianHMM(
        2,
        "spherical",
        max_iter=0,
        startprob_init=[0.5, 0.5],
        transmat_init=[[0.98, 0.02], [0.02, 0.98]],
        means_init=means,
        covariances_init=[1.0, 1.0],
    ).fit(X)
    true_labels = truth.filter_proba(X).argmax(axis=1)
    online, mixture = se.OnlineGaussianHMM(2, seed=0), se.OnlineGMM(2, seed=0)
    hmm_labels, gmm_labels = np.empty(len(X), dtype=int), np.empty(len(X), dtype=int)
    for t, x in enumerate(frame(X).to_dict("records")):
        hmm_labels[t], gmm_labels[t] = online.predict_one(x), mixture.predict_one(x)
        online.learn_one(x)
        mixture.learn_one(x)
    scored = slice(2000, None)  # after both warm-ups and a few blocks
    upper = int(np.argmax(online.means_.ravel()))
    hmm_accuracy = ((hmm_labels[scored] == upper) == (states[scored] == 1)).mean()
    true_accuracy = (true_labels[scored] == states[scored]).mean()
    assert hmm_accuracy >= true_accuracy - 0.01
    switches = {name: int((np.diff(labels[scored]) != 0).sum()) for name, labels in [("hmm", hmm_labels),
                                                                                     ("gmm", gmm_labels)]}
    assert switches["hmm"] * 5 < switches["gmm"]


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("record", "error", "message"),
    [
        ({"f0": float("nan"), "f1": 0.0}, ValueError, "f0"),
        ({"f0": "fast", "f1": 0.0}, TypeError, "'f0' is not a number"),
        ({"f0": 1.0}, ValueError, "'f1' is missing"),
        ({"f0": 1.0, "f1": 0.0, "f2": 3.0}, ValueError, "unexpected feature 'f2'"),
        ([1.0, 0.0], TypeError, "dict"),
    ],
)
def test_a_bad_record_is_a_clear_error_and_changes_nothing(record, error, message):
    """learn_one / predict_one of a bad record raise naming the field; parameters, filter and block stay."""
    X, _ = sticky_stream(700, THREE_STATES, 0.95, seed=6)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, seed=0)
    model.learn_many(frame(X))
    before = json.dumps(model.to_dict())
    for call in (model.learn_one, model.predict_one, model.score_one):
        with pytest.raises(error, match=message):
            call(record)
    assert json.dumps(model.to_dict()) == before


def test_a_bad_frame_is_refused_whole():
    """learn_many with a NaN in row 130 raises naming it and learns none of the frame's rows."""
    X, _ = sticky_stream(700, THREE_STATES, 0.95, seed=7)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, seed=0)
    model.learn_many(frame(X[:400]))
    before = json.dumps(model.to_dict())
    bad = frame(X[400:]).copy()
    bad.iloc[130, 1] = np.nan
    with pytest.raises(ValueError, match="row 130"):
        model.learn_many(bad)
    assert json.dumps(model.to_dict()) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="streamem.OnlineGMM"), "format"),
        (lambda d: d["streams"][0].update(filter=[0.5, 0.6, 0.1]), "filter"),
        (lambda d: d["engine"].update(transmat=[[1.0, 0.0, 0.0]] * 2), "transmat"),
        (lambda d: d["engine"]["stats"].update(first=[1.0, -1.0, 0.0]), "negative"),
        (lambda d: d["streams"][0].update(block=[[1.0, "x"]]), "block"),
        (lambda d: d["streams"][0].update(block=[[1.0, 2.0, 3.0]]), "features"),
        (lambda d: d["streams"][0].update(block=[[1.0, 2.0]] * 64), "full block"),
        (lambda d: d["engine"].update(n_updates=float("inf")), "n_updates"),
        (lambda d: d.update(n_seen=-5), "n_seen"),
        (lambda d: d.update(n_seen=True), "n_seen"),
        (lambda d: d.update(n_seen=1.7), "n_seen"),
        (lambda d: d["engine"].update(means=[[float("nan"), 0.0]] * 3), "means"),
        (lambda d: d["streams"][0].update(block=[[1e200, 0.0]]), "too large"),
        (lambda d: d["engine"]["stats"].update(transitions=[[1e308] * 3] * 3), "per record"),
        (lambda d: d["streams"].append(dict(d["streams"][0])), "twice"),
        (lambda d: d["streams"][0].update(stream=["p", 0]), "stream names"),
    ],
)
def test_a_corrupted_state_is_refused_by_name(change, message):
    """from_dict of a damaged document raises StateError naming what is wrong."""
    X, _ = sticky_stream(700, THREE_STATES, 0.95, seed=8)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, seed=0)
    model.learn_many(frame(X))
    document = copy.deepcopy(model.to_dict())
    change(document)
    with pytest.raises(StateError, match=message):
        se.OnlineGaussianHMM.from_dict(document)


def test_streams_share_parameters_but_not_filters():
    """Two streams in one model: records of one never move the other's filter; each stream's answers are
    its own filter moved one step (the Kafka consumer's partitions)."""
    X, _ = sticky_stream(1000, THREE_STATES, 0.95, seed=9)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:200], stream="a")
    model.filter_and_learn(X[500:600], stream="b")  # the warm-up is two sequences of 200 and 100
    assert model.is_warm and sorted(model.streams_) == ["a", "b"]
    before = model.stream_filter("a").copy()
    model.filter_and_learn(X[600:630], stream="b")  # no update: b's block is not full
    np.testing.assert_array_equal(model.stream_filter("a"), before)
    answers, log_likelihood = model.filter_and_learn(X[200:210], stream="a")
    densities = np.array(
        [multivariate_normal(model.means_[k], model.covariances_[k]).logpdf(X[200]) for k in range(3)]
    )
    joint = np.log(before @ model.transmat_) + densities
    np.testing.assert_allclose(answers[0], np.exp(joint - logsumexp(joint)), rtol=1e-9)
    assert log_likelihood[0] == pytest.approx(logsumexp(joint), rel=1e-12)
    restored = se.OnlineGaussianHMM.from_dict(json.dumps(model.to_dict()))
    for stream in ("a", "b"):
        np.testing.assert_array_equal(restored.stream_filter(stream), model.stream_filter(stream))
    model.forget_stream("b")
    assert model.streams_ == ["a"] and model.stream_filter("b") is None


@pytest.mark.parametrize(("value", "message"), [(np.nan, "row 3: feature 'f1' is nan"), (np.inf, "'f1' is inf"),
                                                (-1e200, "'f1' is -1e\\+200, too large for the model's statistics")])
def test_filter_and_learn_refuses_rows_it_cannot_learn(value, message):
    """filter_and_learn (the consumer's entry) refuses a NaN, an infinity or a value beyond 1e150, naming its
    place, before anything changes."""
    X, _ = sticky_stream(700, THREE_STATES, 0.95, seed=10)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:500], stream="p")
    before = json.dumps(model.to_dict())
    bad = X[500:510].copy()
    bad[3, 1] = value
    with pytest.raises(ValueError, match=message):
        model.filter_and_learn(bad, stream="p")
    assert json.dumps(model.to_dict()) == before


def test_a_warm_up_that_fails_learns_none_of_its_rows():
    """A warm-up fit that cannot be made (constant records, reg_covar=0) raises ValueError and buffers none of
    the call's rows; the model then warms up on records it can fit."""
    model = se.OnlineGaussianHMM(2, warmup=30, reg_covar=0.0, features=("a",), seed=0)
    model.learn_many(np.ones((20, 1)))
    with pytest.raises(ValueError):
        model.learn_many(np.ones((10, 1)))
    assert model.n_seen == 20 and not model.is_warm
    model.learn_many(np.random.default_rng(0).normal(size=(10, 1)))
    assert model.is_warm and model.n_seen == 30


def test_streams_are_named_by_str_or_int():
    """A stream named by a tuple is a TypeError at once (its JSON state could not be read back); str and int
    names survive a JSON round trip."""
    X, _ = sticky_stream(400, THREE_STATES, 0.95, seed=11)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    with pytest.raises(TypeError, match="str, an int or None"):
        model.filter_and_learn(X[:10], stream=("prices", 0))
    assert model.n_seen == 0
    model.filter_and_learn(X[:200], stream="prices/0")
    model.filter_and_learn(X[200:400], stream=7)
    restored = se.OnlineGaussianHMM.from_dict(json.dumps(model.to_dict()))
    assert sorted(map(str, restored.streams_)) == ["7", "prices/0"]
    np.testing.assert_array_equal(restored.stream_filter(7), model.stream_filter(7))


def test_an_empty_record_is_refused_and_the_features_stay_unknown():
    """learn_one({}) raises ValueError and leaves the model able to learn its first real record."""
    model = se.OnlineGaussianHMM(2, warmup=20)
    with pytest.raises(ValueError, match="at least one feature"):
        model.learn_one({})
    assert model.features_ is None
    model.learn_one({"x": 1.0})
    assert model.features_ == ("x",)


def test_a_number_beyond_a_float_in_the_state_text_is_a_state_error():
    """JSON text with n_seen 1e400 raises StateError (not OverflowError)."""
    X, _ = sticky_stream(400, THREE_STATES, 0.95, seed=12)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, seed=0)
    model.learn_many(frame(X))
    text = json.dumps(model.to_dict()).replace('"n_seen": 400', '"n_seen": 1e400')
    with pytest.raises(StateError):
        se.OnlineGaussianHMM.from_dict(text)


def test_outlier_distances_are_squared_mahalanobis_distances_to_the_closest_state():
    """outlier_distances: min over states of (x - m_k)' S_k^-1 (x - m_k), computed here with NumPy; before the
    warm-up, distances from the buffered records' median in robust sds; nothing is learned."""
    X, _ = sticky_stream(700, THREE_STATES, 0.95, seed=13)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:100])
    far = np.array([[0.0, 0.0], [40.0, -3.0]])
    median = np.median(X[:100], axis=0)
    spread = 1.4826 * np.median(np.abs(X[:100] - median), axis=0)
    np.testing.assert_allclose(model.outlier_distances(far), (((far - median) / spread) ** 2).sum(axis=1))
    model.filter_and_learn(X[100:500])
    before = json.dumps(model.to_dict())
    expected = [
        min((x - model.means_[k]) @ np.linalg.solve(model.covariances_[k], x - model.means_[k]) for k in range(3))
        for x in far
    ]
    np.testing.assert_allclose(model.outlier_distances(far), expected, rtol=1e-7)
    assert json.dumps(model.to_dict()) == before


def test_predictions_before_the_warm_up_are_uniform():
    """Before the warm-up every state is equally likely and nothing is learned by predicting."""
    model = se.OnlineGaussianHMM(3, warmup=50)
    assert model.predict_proba_one({"a": 1.0}) == {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    assert math.isfinite(model.score_one({"a": 1.0})) and model.n_seen == 0


def test_filtering_rows_just_screened_answers_as_a_model_that_never_screened_them():
    """The consumer screens a poll's rows (`outlier_distances`), then filters them: the filter may reuse
    the screen's log-densities, but only for the same rows under the same parameters. A restored copy
    (which has screened nothing) gives the same answers bit for bit, also when the parameters moved
    in between (a block learned) or other rows come."""
    X, _ = sticky_stream(1200, THREE_STATES, 0.95, seed=21)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:330])
    for rows, between in ((X[330:340], None), (X[340:350], X[350:420]), (X[420:430], None)):
        model.outlier_distances(rows)
        if between is not None:  # a full block in between: new parameters, the screen's densities are stale
            model.filter_and_learn(between)
        fresh = se.OnlineGaussianHMM.from_dict(json.dumps(model.to_dict()))
        other = rows[::-1].copy() if between is None and rows is X[420:430] else rows
        expected = fresh.filter_and_learn(other)
        answers = model.filter_and_learn(other)
        for got, want in zip(answers, expected, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["gaussian", "regression"])
def test_summarize_then_apply_learns_what_filter_and_learn_learns(kind):
    """At a block boundary, `apply(summarize(block, stream).statistics)` gives the parameters that
    `filter_and_learn(block, stream)` gives, bit for bit; summarize itself changes nothing."""
    X, _ = sticky_stream(900, THREE_STATES, 0.95, seed=31)
    if kind == "gaussian":
        model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
        rows = X
    else:
        model = se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, features=("f0",), seed=0)
        rows = np.column_stack([X[:, :1], 1.5 * X[:, 0] + X[:, 1]])
    model.filter_and_learn(rows[:300], stream="s")  # the warm-up: the stream's block is empty now
    model.filter_and_learn(rows[300:364], stream="s")  # one block learned; empty again
    copy_ = type(model).from_dict(json.dumps(model.to_dict()))
    before = json.dumps(copy_.to_dict())
    summary = copy_.summarize(rows[364:428], stream="s")
    assert json.dumps(copy_.to_dict()) == before
    assert summary.statistics.count == pytest.approx(64.0)
    copy_.apply(summary.statistics)
    model.filter_and_learn(rows[364:428], stream="s")
    assert copy_.transmat_.tolist() == model.transmat_.tolist()
    mine, theirs = copy_.to_dict()["engine"], model.to_dict()["engine"]
    assert mine["stats"] == theirs["stats"] and mine["n_updates"] == theirs["n_updates"]
    assert copy_.n_seen == model.n_seen  # apply counts the records its statistics summarise


def test_summarize_is_forward_backward_from_the_streams_filter():
    """summarize's posteriors and log-likelihoods are hmmlearn's for the rows, started from the stream's
    filter moved one step (hmmlearn's startprob_ = filter @ transmat)."""
    from hmmlearn import hmm as hmmlearn_hmm

    X, _ = sticky_stream(500, THREE_STATES, 0.95, seed=33)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:330], stream=7)
    reference = hmmlearn_hmm.GaussianHMM(3, covariance_type="full", init_params="", params="")
    reference.startprob_ = model.stream_filter(7) @ model.transmat_
    reference.transmat_, reference.means_, reference.covars_ = model.transmat_, model.means_, model.covariances_
    rows = X[330:380]
    summary = model.summarize(rows, stream=7)
    np.testing.assert_allclose(summary.responsibilities, reference.predict_proba(rows), rtol=1e-7, atol=1e-10)
    assert summary.log_likelihood.sum() == pytest.approx(reference.score(rows), rel=1e-10)


def test_apply_refuses_statistics_that_do_not_fit_and_changes_nothing():
    X, _ = sticky_stream(400, THREE_STATES, 0.95, seed=35)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    with pytest.raises(ValueError, match="before its warm-up"):
        model.summarize(X[:10])
    model.filter_and_learn(X[:300])
    with pytest.raises(ValueError, match="at least one row"):
        model.summarize(X[:0])
    good = model.summarize(X[300:340]).statistics
    other = se.OnlineGaussianHMM(2, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    other.filter_and_learn(X[:300])
    before = json.dumps(model.to_dict())
    bad_values = se.HMMStats(good.first, good.transitions * np.nan, good.emissions)
    from test_gaussian_hmm import negated

    refused = [(other.summarize(X[300:340]).statistics, "do not fit"), (bad_values, "finite"),
               (good.emissions, "learns HMMStats"), *((bad, "negative|semi-definite") for bad in negated(good))]
    for statistics, message in refused:
        with pytest.raises(ValueError, match=message):
            model.apply(statistics)
        assert json.dumps(model.to_dict()) == before
    model.apply(good)
    assert json.dumps(model.to_dict()) != before


@pytest.mark.parametrize("kind", ["gaussian", "regression"])
def test_filter_and_summarize_with_each_block_applied_at_once_is_filter_and_learn(kind):
    """filter_and_summarize leaves the parameters alone and hands back each completed block's statistics;
    applying each as it comes gives filter_and_learn's answers, parameters and n_seen."""
    X, _ = sticky_stream(940, THREE_STATES, 0.95, seed=37)
    if kind == "gaussian":
        make = lambda: se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)  # noqa: E731
        rows = X
    else:
        make = lambda: se.OnlineMarkovSwitchingRegression(2, warmup=300, batch_size=64, features=("f0",), seed=0)  # noqa: E731
        rows = np.column_stack([X[:, :1], 1.5 * X[:, 0] + X[:, 1]])
    reference, deferred = make(), make()
    expected, expected_ll = reference.filter_and_learn(rows, stream="s")
    answers, log_likelihood, blocks = deferred.filter_and_summarize(rows[:330], stream="s")
    # the warm-up; the 30 rows of the open block count in n_seen once their statistics are applied
    assert blocks == [] and deferred.is_warm and deferred.n_seen == 300
    for start, end in [(330, 364), *((s, s + 64) for s in range(364, 940, 64))]:  # calls that end with a block
        transmat = deferred.transmat_.copy()
        got, got_ll, blocks = deferred.filter_and_summarize(rows[start:end], stream="s")
        assert deferred.transmat_.tolist() == transmat.tolist()  # only apply moves the parameters
        answers, log_likelihood = np.vstack([answers, got]), np.r_[log_likelihood, got_ll]
        assert len(blocks) == 1
        for statistics in blocks:
            assert statistics.count == pytest.approx(64.0)
            deferred.apply(statistics)
    np.testing.assert_allclose(answers, expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(log_likelihood[300:], expected_ll[300:], rtol=1e-10)
    np.testing.assert_allclose(deferred.transmat_, reference.transmat_, rtol=1e-10)
    assert deferred.n_seen == reference.n_seen == 940


def test_filter_known_answers_as_the_filter_and_learns_nothing():
    """filter_known answers rows as filter_and_learn would and moves the stream's filter through them,
    but learns nothing: parameters, n_seen and the running statistics stay, the open block is dropped."""
    X, _ = sticky_stream(500, THREE_STATES, 0.95, seed=39)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:330], stream="s")  # an open block of 30 rows
    reference = se.OnlineGaussianHMM.from_dict(model.to_dict())
    engine_before = json.dumps(model.to_dict()["engine"])
    got, got_ll = model.filter_known(X[330:350], stream="s")
    want, want_ll = reference.filter_and_learn(X[330:350], stream="s")  # 50 rows: no block completes
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got_ll, want_ll, rtol=1e-12)
    assert json.dumps(model.to_dict()["engine"]) == engine_before and model.n_seen == 330
    state = model.stream_state("s")
    assert state["block"] == [] and state["filter"] == pytest.approx(got[-1].tolist(), rel=1e-12)
    np.testing.assert_allclose(model.filter_known(X[350:360], stream="s")[0],
                               reference.filter_and_learn(X[350:360], stream="s")[0], rtol=1e-9)


def test_a_stream_goes_on_in_another_copy_of_the_model():
    """stream_state / restore_stream hand a stream (filter and open block) to a copy of the model: its
    answers there equal the original's; a state that does not fit is refused by name and changes nothing."""
    X, _ = sticky_stream(600, THREE_STATES, 0.95, seed=41)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:300], stream="other")
    model.filter_and_learn(X[300:420], stream="p")  # a block learned, 56 rows open
    copy_ = se.OnlineGaussianHMM.from_dict(model.to_dict())
    copy_.forget_stream("p")
    assert copy_.stream_state("p") is None
    state = json.loads(json.dumps(model.stream_state("p")))
    assert len(state["block"]) == 56
    copy_.restore_stream("p", state)
    for got, want in zip(copy_.filter_and_learn(X[420:600], stream="p"), model.filter_and_learn(X[420:600], stream="p"),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    before = json.dumps(copy_.to_dict())
    bad = [
        ({**state, "filter": [0.5, 0.5]}, "3 probabilities"),
        ({**state, "filter": [0.5, 0.7, -0.2]}, "probabilities"),
        ({**state, "block": X[:64].tolist()}, "full block"),
        ({**state, "block": [[1.0, 2.0, 3.0]]}, "block"),
        ({"filter": state["filter"]}, "block"),
        ("text", "must be"),
    ]
    for document, message in bad:
        with pytest.raises(StateError, match=message):
            copy_.restore_stream("p", document)
        assert json.dumps(copy_.to_dict()) == before
    cold = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    with pytest.raises(StateError, match="before its warm-up"):
        cold.restore_stream("p", state)


def test_a_restore_keeps_the_filter_as_answered_when_another_stream_moved_the_parameters():
    """Stream a answers rows, stream b's block then moves the parameters: a restored copy goes on from a's
    filter as it was answered (not recomputed under the new parameters), as the original does."""
    X, _ = sticky_stream(800, THREE_STATES, 0.95, seed=43)
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:300], stream="a")
    model.filter_and_learn(X[300:330], stream="a")  # open block of a, answered under the warm-up's parameters
    transmat = model.transmat_.copy()
    model.filter_and_learn(X[330:394], stream="b")  # b's first block moves the parameters
    assert not np.allclose(model.transmat_, transmat)
    copy_ = se.OnlineGaussianHMM.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(copy_.filter_and_learn(X[394:420], stream="a")[0],
                               model.filter_and_learn(X[394:420], stream="a")[0], rtol=1e-12, atol=1e-15)
    state = model.stream_state("a")
    with pytest.raises(StateError, match="latest"):
        copy_.restore_stream("a", {**state, "latest": [1.0]})


@pytest.mark.filterwarnings("ignore:Baum-Welch did not converge")  # five iterations give a start, that is all
@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical", "tied"])
def test_relabelled_statistics_are_those_of_the_chain_with_its_states_renamed(covariance_type):
    """HMMStats.relabelled(order) equals the statistics the same rows give under the parameters with
    state k renamed order[k] (the batch model's summarize at fixed parameters)."""
    X, _ = sticky_stream(400, THREE_STATES, 0.9, seed=45)
    fitted = se.GaussianHMM(3, covariance_type=covariance_type, max_iter=5, random_state=0).fit(X)
    order = np.array([2, 0, 1])

    def at(startprob, transmat, means, covariances):
        return se.GaussianHMM(3, covariance_type=covariance_type, max_iter=0, startprob_init=startprob,
                              transmat_init=transmat, means_init=means, covariances_init=covariances).fit(X)

    covariances = fitted.covariances_ if covariance_type == "tied" else fitted.covariances_[order]
    renamed = at(fitted.startprob_[order], fitted.transmat_[np.ix_(order, order)], fitted.means_[order], covariances)
    original = at(fitted.startprob_, fitted.transmat_, fitted.means_, fitted.covariances_)
    want, got = renamed.summarize(X).statistics, original.summarize(X).statistics.relabelled(order)
    np.testing.assert_allclose(got.first, want.first, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.transitions, want.transitions, rtol=1e-9, atol=1e-12)
    for name, value in want.emissions.to_arrays().items():
        np.testing.assert_allclose(got.emissions.to_arrays()[name], value, rtol=1e-9, atol=1e-9)


def test_a_fresh_models_first_rows_are_judged_with_each_other():
    """Before 20 records are buffered, outlier_distances judges rows from the median and robust spread of the
    buffered records and the rows together: one absurd record among a fresh model's first stands out."""
    X, _ = sticky_stream(60, THREE_STATES, 0.95, seed=47)
    rows = X.copy()
    rows[7] = [1e6, 0.0]
    model = se.OnlineGaussianHMM(3, warmup=300, batch_size=64, features=("f0", "f1"), seed=0)
    model.filter_and_learn(X[:5])
    pool = np.vstack([X[:5], rows])
    median = np.median(pool, axis=0)
    spread = 1.4826 * np.median(np.abs(pool - median), axis=0)
    np.testing.assert_allclose(model.outlier_distances(rows), (((rows - median) / spread) ** 2).sum(axis=1))
    assert model.outlier_distances(rows)[7] > 1e10
    assert (model.outlier_distances(rows[:10]) == 0).all()  # 15 records in all: no reference yet
