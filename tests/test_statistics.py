"""Statistics as every model's public currency: summarize, apply, and their one JSON serialiser."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

import streamem as se
from streamem.state import StateError

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


def two_blobs(n: int = 2000, d: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.where(rng.random((n, 1)) < 0.4, 0.0, 4.0)
    return centres + rng.normal(size=(n, d)) * np.linspace(0.5, 1.5, d)


def regression_data(n: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    line = rng.random(n) < 0.5
    y = np.where(line, X @ [2.0, -1.0] + 1.0, X @ [-1.0, 0.5] - 2.0) + 0.1 * rng.normal(size=n)
    return X, y


# -- the serialiser --------------------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gaussian_statistics_survive_json(covariance_type):
    """to_dict -> JSON text -> from_dict gives the same arrays, type and count, for every covariance layout."""
    X = two_blobs()
    stats = se.GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X).summarize(X).statistics
    again = se.GaussianStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert type(again) is se.GaussianStats and again.count == pytest.approx(len(X))
    for name, value in stats.to_arrays().items():
        np.testing.assert_array_equal(getattr(again, name), value)


def test_regression_statistics_survive_json():
    """The regression family's statistics round-trip too (xx is (K, d+1, d+1))."""
    X, y = regression_data()
    stats = se.RegressionMixture(2, random_state=0).fit(X, y).summarize(X, y).statistics
    again = se.RegressionStats.from_dict(json.dumps(stats.to_dict()))
    assert again.shapes == {"shift": (3,), "mass": (2,), "xx": (2, 3, 3), "xy": (2, 3), "yy": (2,)}
    for name, value in stats.to_arrays().items():
        np.testing.assert_array_equal(getattr(again, name), value)


@pytest.fixture
def document():
    X = two_blobs()
    return se.GaussianMixture(2, random_state=0).fit(X).summarize(X).statistics.to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(first=d["first"][:1]), "'stats.first' has shape (1, 3), expected (2, 3)"),
        (lambda d: d.update(second=[row[:4] for row in d["second"]]), "'stats.second' has shape (2, 4)"),
        (lambda d: d.pop("mass"), "field 'mass' is missing"),
        (lambda d: d.update(mass=[]), "'mass' must be a non-empty list of numbers"),
        (lambda d: d.update(type="RegressionStats"), "type 'RegressionStats', expected 'GaussianStats'"),
        (lambda d: d.update(extra=[1.0]), "unknown field 'extra'"),
        (lambda d: d["first"][0].__setitem__(0, float("nan")), "'stats.first' contains non-finite values"),
        (lambda d: d["second"][0].__setitem__(0, -5.0), "'stats.second' is not positive semi-definite"),
        (lambda d: d.update(mass=[-1.0, 2.0]), "'stats.mass' has negative values"),
        (lambda d: d.update(shift="abc"), "'shift' must be a non-empty list of numbers"),
        (lambda d: d.update(mass=[True, 1.0]), "'mass' must be a non-empty list of numbers"),
        (lambda d: d.update(first=[[v * 1000 for v in row] for row in d["first"]]), "together) is not positive"),
    ],
)
def test_a_bad_statistics_document_is_refused_naming_the_field(document, change, message):
    """Wrong shapes, missing or unknown fields, another family, NaN, or sums of squares that are not: StateError."""
    change(document)
    with pytest.raises(StateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        se.GaussianStats.from_dict(document)


def test_moments_no_data_could_have_are_refused_for_every_layout():
    """Fields that pass one by one but describe no records (first moments x 1000) are refused: diagonal
    moments, and the regression family's [[xx, xy], [xy', yy]]; text that is not UTF-8 is a StateError too."""
    X = two_blobs()
    diag = se.GaussianMixture(2, covariance_type="diag", random_state=0).fit(X).summarize(X).statistics.to_dict()
    diag["first"] = [[v * 1000 for v in row] for row in diag["first"]]
    with pytest.raises(StateError, match="no records have such moments"):
        se.GaussianStats.from_dict(diag)
    Xr, y = regression_data()
    regression = se.RegressionMixture(2, random_state=0).fit(Xr, y).summarize(Xr, y).statistics.to_dict()
    regression["xy"] = [[v * 1000 for v in row] for row in regression["xy"]]
    with pytest.raises(StateError, match="xx, xy, yy together"):
        se.RegressionStats.from_dict(regression)
    with pytest.raises(StateError, match="not valid JSON"):
        se.GaussianStats.from_dict(b"\xff\xfe")


def test_statistics_add_and_scale():
    """Statistics of two halves added (about different shifts) equal the statistics of the whole."""
    X = two_blobs()
    model = se.GaussianMixture(2, random_state=0).fit(X)
    whole = model.summarize(X).statistics
    halves = model.summarize(X[:700]).statistics + model.summarize(X[700:] + 0.0).statistics
    halves = halves.recentred(whole.shift)
    for name, value in whole.to_arrays().items():
        np.testing.assert_allclose(getattr(halves, name), value, rtol=1e-9, atol=1e-9)
    assert whole.scaled(0.5).count == pytest.approx(len(X) / 2)


# -- batch models: apply is the M-step ---------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_batch_summarize_then_apply_is_one_em_iteration_as_scikit_learn(covariance_type):
    """From the same parameters, summarize + apply equals one iteration of scikit-learn's EM."""
    X = two_blobs(d=2)
    ours = se.GaussianMixture(2, covariance_type=covariance_type, max_iter=2, tol=0, random_state=0)
    with pytest.warns(se.ConvergenceWarning):
        ours.fit(X)
    reference = SklearnGaussianMixture(
        2,
        covariance_type=covariance_type,
        max_iter=1,
        tol=0,
        weights_init=ours.weights_,
        means_init=ours.means_,
        precisions_init=ours.precisions_,
        reg_covar=1e-6,
    )
    with pytest.warns(UserWarning):  # scikit-learn's ConvergenceWarning after its one iteration
        reference.fit(X)
    ours.apply(ours.summarize(X).statistics)
    np.testing.assert_allclose(ours.weights_, reference.weights_, rtol=1e-9)
    np.testing.assert_allclose(ours.means_, reference.means_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.covariances_, reference.covariances_, rtol=1e-8, atol=1e-12)


def test_batch_apply_refuses_statistics_of_another_model():
    """Statistics of another width or family raise ValueError, and the model keeps its parameters."""
    X = two_blobs()
    model = se.GaussianMixture(2, random_state=0).fit(X)
    before = model.means_.copy()
    narrow = se.GaussianMixture(2, random_state=0).fit(X[:, :2]).summarize(X[:, :2]).statistics
    with pytest.raises(ValueError, match="do not fit this model"):
        model.apply(narrow)
    Xr, y = regression_data()
    with pytest.raises(ValueError, match="RegressionStats"):
        model.apply(se.RegressionMixture(2, random_state=0).fit(Xr, y).summarize(Xr, y).statistics)
    np.testing.assert_array_equal(model.means_, before)


# -- online models: summarize + apply equals learn_many ------------------------------------------
WARM = 628  # the default warm-up (500) and one mini-batch (128): nothing left waiting in the buffer


def _warm(model, X, y=None):
    frame = pd.DataFrame(X[:WARM], columns=["a", "b", "c"][: X.shape[1]])
    if y is None:
        model.learn_many(frame)
    else:
        model.learn_many(frame, pd.Series(y[:WARM]))
    return model


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_online_summarize_and_apply_per_mini_batch_equals_learn_many(covariance_type):
    """A warm OnlineGMM fed summarize(chunk) + apply per batch_size rows ends where learn_many ends."""
    X = two_blobs()
    make = lambda: se.OnlineGMM(2, covariance_type=covariance_type, features=("a", "b", "c"), seed=0)  # noqa: E731
    by_learn, by_stats = _warm(make(), X), _warm(make(), X)
    rest = X[WARM : WARM + 1024]  # 8 mini-batches of the default 128
    by_learn.learn_many(pd.DataFrame(rest, columns=["a", "b", "c"]))
    answers = []
    for start in range(0, len(rest), by_stats.batch_size):
        summary = by_stats.summarize(rest[start : start + by_stats.batch_size])
        answers.append(summary.responsibilities)
        by_stats.apply(summary.statistics)
    assert by_stats.n_seen == by_learn.n_seen == WARM + 1024
    assert by_stats.n_updates == by_learn.n_updates
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(by_stats, name), getattr(by_learn, name), rtol=1e-12, atol=1e-14)
    # the responsibilities are those of the model before each mini-batch: row sums 1, shape (n, K)
    np.testing.assert_allclose(np.vstack(answers).sum(axis=1), 1.0)


def test_statistics_of_single_records_pool_into_mini_batches_as_learn_many():
    """apply pools statistics until batch_size records: one record at a time, through a JSON state round
    trip mid-pool, and from responsibilities the caller has (`statistics_of`), ends where learn_many ends."""
    X = two_blobs()
    make = lambda: se.OnlineGMM(2, features=("a", "b", "c"), seed=0)  # noqa: E731
    by_learn, by_stats = _warm(make(), X), _warm(make(), X)
    rest = X[WARM : WARM + 300]  # two mini-batches and 44 records pooled
    by_learn.learn_many(pd.DataFrame(rest, columns=["a", "b", "c"]))
    for i, row in enumerate(rest):
        rows = row[None, :]
        responsibilities = by_stats.assign_many(rows)[0]
        by_stats.apply(by_stats.statistics_of(rows, responsibilities))
        if i == 200:
            by_stats = se.OnlineGMM.from_dict(json.loads(json.dumps(by_stats.to_dict())))
    assert by_stats.n_seen == by_learn.n_seen and by_stats.n_updates == by_learn.n_updates
    np.testing.assert_allclose(by_stats.means_, by_learn.means_, rtol=1e-10)
    np.testing.assert_allclose(by_stats.covariances_, by_learn.covariances_, rtol=1e-10)
    # the 44 pooled records are learned with the next mini-batch's 84, as learn_many's buffered ones are
    more = X[WARM + 300 : WARM + 384]
    by_learn.learn_many(pd.DataFrame(more, columns=["a", "b", "c"]))
    by_stats.apply(by_stats.summarize(more).statistics)
    np.testing.assert_allclose(by_stats.means_, by_learn.means_, rtol=1e-10)


@pytest.mark.parametrize("kind", ["full", "full, averaged", "full, short rows", "diag", "regression"])
def test_learn_answered_is_apply_of_statistics_of_chunk_after_chunk(kind):
    """learn_answered (the consumer's path: rows checked once) learns what `apply(statistics_of(...))` learns
    mini-batch after mini-batch, the first completing the 30 records pooled before (full covariances: the
    whole mini-batches in one compiled call, whose sums move the last bits only)."""
    if kind == "regression":
        X, y = regression_data()
        make = lambda: _warm(se.OnlineRegressionMixture(2, seed=0), X, y)  # noqa: E731
    else:
        X, y = two_blobs(), None
        options = {"covariance_type": kind.split(",")[0], "averaging": 3 if "averaged" in kind else None}
        make = lambda: _warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0, **options), X)  # noqa: E731
    target = lambda rows: None if y is None else y[rows]  # noqa: E731
    by_block, by_chunk = make(), make()
    for model in (by_block, by_chunk):
        model.apply(model.summarize(X[WARM : WARM + 30], target(slice(WARM, WARM + 30))).statistics)
    block = slice(WARM + 30, WARM + 1054)
    answers = by_block.assign_many(X[block]) if y is None else by_block.assign_many(X[block], y[block])
    # short rows: each sums to 1 - 1e-7 (within the check), so no 128 of them make a whole mini-batch
    responsibilities = answers[0] * (1 - 1e-7) if "short" in kind else answers[0]
    by_block.learn_answered(X[block], responsibilities, target(block))
    start, size = 0, by_chunk.records_until_update
    rows, resp = X[block], responsibilities
    while start < rows.shape[0]:
        chunk = slice(start, start + size)
        by_chunk.apply(by_chunk.statistics_of(rows[chunk], resp[chunk], None if y is None else y[block][chunk]))
        start, size = start + size, by_chunk.batch_size
    assert by_block.n_seen == by_chunk.n_seen == WARM + 1054 and by_block.n_updates == by_chunk.n_updates
    assert by_block.records_until_update == by_chunk.records_until_update  # the same records left pooled
    for name, value in by_chunk.statistics_.to_arrays().items():
        np.testing.assert_allclose(by_block.statistics_.to_arrays()[name], value, rtol=1e-12, atol=1e-13)
    if "averaged" in kind:
        np.testing.assert_allclose(by_block.means_, by_chunk.means_, rtol=1e-12)  # the averaged parameters


@pytest.mark.parametrize("tail", [0, 17])
def test_learn_answered_completes_a_pool_in_its_compiled_call(monkeypatch, tail):
    """The rows that complete what `apply` pooled (a Kafka poll's first chunk, when polls and mini-batches do not
    line up) are learned in the compiled call with the whole mini-batches after them, to the same statistics as
    chunk after chunk: statistics are computed apart only for the rows left pooled after the last one."""
    X = two_blobs()
    by_block, by_chunk = (_warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0), X) for _ in range(2))
    for model in (by_block, by_chunk):
        model.apply(model.summarize(X[WARM : WARM + 30]).statistics)
    block = slice(WARM + 30, WARM + 30 + 98 + 3 * 128 + tail)
    responsibilities = by_block.assign_many(X[block])[0]
    apart = []
    alone = type(by_block)._answered_statistics
    monkeypatch.setattr(by_block, "_answered_statistics", lambda rows, resp: apart.append(len(rows)) or alone(
        by_block, rows, resp))
    by_block.learn_answered(X[block], responsibilities)
    assert apart == ([tail] if tail else [])
    start, size, rows = 0, by_chunk.records_until_update, X[block]
    while start < rows.shape[0]:
        by_chunk.apply(by_chunk.statistics_of(rows[start : start + size], responsibilities[start : start + size]))
        start, size = start + size, by_chunk.batch_size
    assert by_block.n_seen == by_chunk.n_seen and by_block.n_updates == by_chunk.n_updates
    assert by_block.records_until_update == by_chunk.records_until_update
    for name, value in by_chunk.statistics_.to_arrays().items():
        np.testing.assert_allclose(by_block.statistics_.to_arrays()[name], value, rtol=1e-12, atol=1e-13)


def test_learn_answered_one_mini_batch_is_learn_many():
    """Responsibilities from assign_many, learned as one mini-batch, give learn_many's parameters (its E-step
    is the same one)."""
    X = two_blobs()
    by_answers = _warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0), X)
    by_learn = _warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0), X)
    rows = X[WARM : WARM + 128]
    by_answers.learn_answered(rows, by_answers.assign_many(rows)[0])
    by_learn.learn_many(rows)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(by_answers, name), getattr(by_learn, name), rtol=1e-12, atol=1e-14)


def test_learn_answered_refuses_what_it_cannot_learn():
    X = two_blobs()
    cold = se.OnlineGMM(2, features=("a", "b", "c"))
    with pytest.raises(ValueError, match="warm-up"):
        cold.learn_answered(X[:10], np.full((10, 2), 0.5))
    model = _warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0), X)
    before = model.statistics_.to_arrays()
    with pytest.raises(ValueError, match="responsibilities must be"):
        model.learn_answered(X[:10], np.full((10, 3), 1 / 3))
    with pytest.raises(ValueError, match="responsibilities must be"):
        model.learn_answered(X[:10], np.full((10, 2), 0.7))
    with pytest.raises(ValueError, match="finite"):
        model.learn_answered(np.vstack([X[:9], [[np.inf, 0.0, 0.0]]]), np.full((10, 2), 0.5))
    for name, value in before.items():  # nothing learned from a refused call
        np.testing.assert_array_equal(model.statistics_.to_arrays()[name], value)
    assert model.n_seen == WARM


def test_records_learned_as_statistics_count_in_the_moved_stream_window():
    """Isolated outliers between batches learned through apply (the consumer's path) age out of the moved-stream
    window: 80 of them, one per 200 good records, never make the model warm up again."""
    X = two_blobs(20000)
    model = _warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0, outliers="skip"), X)
    for k in range(80):
        good = X[WARM + 200 * k : WARM + 200 * (k + 1)]
        model.apply(model.summarize(good).statistics)
        model.learn_many(np.array([[1e5, -1e5, 0.0]]))  # refused and skipped
    assert model.is_warm and model.n_outliers == 80
    assert model.n_updates == pytest.approx(WARM / 128 + 80)  # one update per apply, none dropped by a re-warm


def test_pooled_regression_statistics_gain_new_features():
    """A regression model with pooled statistics that meets a new feature widens them too: it saves, reloads
    and learns on."""
    X, y = regression_data()
    model = _warm(se.OnlineRegressionMixture(2, seed=0), X, y)
    model.apply(model.summarize(X[WARM : WARM + 30], y[WARM : WARM + 30]).statistics)  # 30 pooled
    frame = pd.DataFrame({"a": X[WARM + 30 :, 0], "b": X[WARM + 30 :, 1], "c": 1.0})
    model.learn_many(frame.iloc[:10], pd.Series(y[WARM + 30 : WARM + 40]))
    again = se.OnlineRegressionMixture.from_dict(json.loads(json.dumps(model.to_dict())))
    rows = frame.iloc[10:200].to_numpy()
    again.apply(again.summarize(rows, y[WARM + 40 : WARM + 230]).statistics)
    assert again.coef_.shape == (2, 3) and np.all(np.isfinite(again.coef_))


def test_averaging_that_started_after_statistics_survives_a_state_round_trip():
    """A model started from statistics of 300 records (fewer than its warm-up of 500) averages from update
    300/128 + averaging; saved and reloaded before that, it goes on exactly as the model that never stopped."""
    X = two_blobs(4000)
    kept = se.OnlineGMM(2, features=("a", "b", "c"), seed=0, averaging=2)
    kept.apply(kept.initial_statistics(X[:300]))
    kept.learn_many(X[2000:2100])
    reloaded = se.OnlineGMM.from_dict(json.loads(json.dumps(kept.to_dict())))
    for model in (kept, reloaded):
        model.learn_many(X[2100:4000])
    np.testing.assert_array_equal(reloaded.means_, kept.means_)


def test_online_regression_summarize_and_apply_equals_learn_many():
    """The same for the regression mixture, from arrays in `feature_names_` order."""
    X, y = regression_data()
    make = lambda: se.OnlineRegressionMixture(2, seed=0)  # noqa: E731
    by_learn, by_stats = _warm(make(), X, y), _warm(make(), X, y)
    rest, target = X[WARM : WARM + 1024], y[WARM : WARM + 1024]
    by_learn.learn_many(pd.DataFrame(rest, columns=["a", "b"]), pd.Series(target))
    for start in range(0, len(rest), 128):
        by_stats.apply(by_stats.summarize(rest[start : start + 128], target[start : start + 128]).statistics)
    for name in ("weights_", "coef_", "intercept_", "noise_variance_"):
        np.testing.assert_allclose(getattr(by_stats, name), getattr(by_learn, name), rtol=1e-10, atol=1e-12)


def test_summarize_changes_nothing():
    """summarize is a pure E-step: the model's state document is the same before and after."""
    X = two_blobs()
    model = _warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0), X)
    before = json.dumps(model.to_dict())
    model.summarize(X[:500])
    assert json.dumps(model.to_dict()) == before


def test_a_cold_model_starts_from_applied_statistics_and_keeps_its_waiting_records():
    """apply on a cold model warms it from the statistics; the records in its warm-up buffer are learned
    after them, not dropped (n_seen counts both)."""
    X = two_blobs()
    donor = se.OnlineGMM(2, features=("a", "b", "c"), seed=0)
    start = donor.initial_statistics(X[:500])
    assert start.count == pytest.approx(500)
    model = se.OnlineGMM(2, features=("a", "b", "c"), seed=0)
    model.learn_many(pd.DataFrame(X[500:800], columns=["a", "b", "c"]))  # 300 records wait for the warm-up
    assert not model.is_warm
    model.apply(start)
    assert model.is_warm and model.n_seen == 800
    assert model.n_updates == pytest.approx(500 / 128 + 2)  # 300 waiting records: 2 full mini-batches learned
    reference = se.GaussianMixture(2, random_state=0).fit(X[:800])
    order = np.argsort(model.means_[:, 0])
    np.testing.assert_allclose(model.means_[order], reference.means_[np.argsort(reference.means_[:, 0])], atol=0.15)


def test_online_apply_refuses_statistics_that_do_not_fit():
    """Another family, another width, NaN, or a model without features: ValueError, nothing learned."""
    X = two_blobs()
    model = _warm(se.OnlineGMM(2, features=("a", "b", "c"), seed=0), X)
    before = json.dumps(model.to_dict())
    narrow = se.GaussianMixture(2, random_state=0).fit(X[:, :2]).summarize(X[:, :2]).statistics
    with pytest.raises(ValueError, match="do not fit"):
        model.apply(narrow)
    good = model.summarize(X[:128]).statistics
    bad = type(good)(shift=good.shift, mass=good.mass, first=good.first * np.nan, second=good.second)
    with pytest.raises(ValueError, match="finite"):
        model.apply(bad)
    Xr, y = regression_data()
    with pytest.raises(ValueError, match="OnlineGMM learns GaussianStats"):
        model.apply(se.RegressionMixture(2, random_state=0).fit(Xr, y).summarize(Xr, y).statistics)
    assert json.dumps(model.to_dict()) == before
    with pytest.raises(ValueError, match="does not know its features"):
        se.OnlineGMM(2).apply(good)


def test_online_arrays_are_checked_like_frames():
    """An array of the wrong width, or with NaN, is refused naming the column and row."""
    model = se.OnlineGMM(2, features=("a", "b"), seed=0)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        model.summarize(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="feature 'b' is NaN in row 1"):
        model.learn_many(np.array([[0.0, 1.0], [2.0, np.nan]]))
