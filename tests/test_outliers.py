"""The outlier guard of the online estimators: absurd records are refused (or skipped), never learned."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import streamem as se
from streamem.outliers import DEFAULT_THRESHOLD

CENTRES = np.array([[0.0, 0.0], [6.0, 6.0]])
ABSURD = [1e300, 2.0**65, 1e6]


def _points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return CENTRES[rng.integers(2, size=n)] + rng.normal(size=(n, 2))


def _frame(points: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(points, columns=["x0", "x1"])


def _warm_gmm(**params) -> se.OnlineGMM:
    model = se.OnlineGMM(2, batch_size=50, warmup=200, seed=0, **params)
    model.learn_many(_frame(_points(430)))
    return model


def _lines(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, n)
    first = rng.random(n) < 0.5
    y = np.where(first, 0.5 * x + 1.0, 1.5 * x + 2.0) + rng.normal(0.0, np.where(first, 0.1, 0.2))
    return pd.DataFrame({"x": x}), pd.Series(y)


def _warm_regression(**params) -> se.OnlineRegressionMixture:
    model = se.OnlineRegressionMixture(2, batch_size=50, warmup=200, seed=0, **params)
    model.learn_many(*_lines(430))
    return model


def _state(model) -> str:
    return json.dumps(model.to_dict())


@pytest.mark.parametrize("value", ABSURD)
def test_learn_one_refuses_an_absurd_value_and_changes_nothing(value):
    """learn_one raises OutlierError naming the feature for 1e300, 2**65 and 1e6; the state is bit-identical."""
    model = _warm_gmm()
    before = _state(model)
    with pytest.raises(se.OutlierError, match="feature 'x0'") as caught:
        model.learn_one({"x0": value, "x1": 0.0})
    assert isinstance(caught.value, ValueError)
    assert _state(model) == before


@pytest.mark.parametrize("value", ABSURD)
def test_skip_mode_skips_an_absurd_value_and_counts_it(value):
    """outliers="skip": the record is not learned (n_seen, buffer, parameters unchanged) and is counted."""
    model = _warm_gmm(outliers="skip")
    before = model.to_dict()
    model.learn_one({"x0": value, "x1": 0.0})
    after = model.to_dict()
    assert after.pop("n_outliers") == before.pop("n_outliers") + 1
    assert json.dumps(after) == json.dumps(before)


def test_learn_mode_still_refuses_values_that_overflow_the_statistics():
    """outliers="learn" turns the distance check off, but a value whose square overflows still raises."""
    model = _warm_gmm(outliers="learn")
    before = _state(model)
    with pytest.raises(se.OutlierError, match="too large"):
        model.learn_one({"x0": 1e300, "x1": 0.0})
    assert _state(model) == before
    model.learn_one({"x0": 1e6, "x1": 0.0})
    assert model.n_seen == 431


def test_learn_many_raise_mode_names_the_row_and_learns_nothing():
    """A frame holding one outlier raises, naming its row, before learning any of its rows."""
    model = _warm_gmm()
    before = _state(model)
    frame = _frame(_points(300, seed=1))
    frame.loc[250, "x1"] = 2.0**65
    with pytest.raises(se.OutlierError, match="row 250.*feature 'x1'"):
        model.learn_many(frame)
    assert _state(model) == before


def test_learn_many_skip_mode_learns_exactly_the_clean_rows():
    """outliers="skip": learn_many with outliers gives the model of the same frame without them."""
    frame = _frame(_points(300, seed=1))
    dirty = frame.copy()
    for row, value in zip((10, 120, 299), ABSURD, strict=True):
        dirty.loc[row, "x0"] = value
    clean = frame.drop(index=[10, 120, 299])
    skipping, reference = _warm_gmm(outliers="skip"), _warm_gmm(outliers="skip")
    skipping.learn_many(dirty)
    reference.learn_many(clean)
    assert skipping.n_outliers == 3
    assert skipping.n_seen == reference.n_seen == 430 + 297
    np.testing.assert_array_equal(skipping.means_, reference.means_)
    np.testing.assert_array_equal(skipping.covariances_, reference.covariances_)


def test_screen_many_says_which_rows_are_outliers_and_why():
    """screen_many flags exactly the absurd rows, with the squared distance and a reason naming the feature."""
    model = _warm_gmm()
    frame = _frame(_points(100, seed=2))
    frame.loc[5, "x0"], frame.loc[50, "x1"], frame.loc[70, "x0"] = ABSURD
    screen = model.screen_many(frame)
    assert np.flatnonzero(screen.outlier).tolist() == [5, 50, 70]
    assert screen.distance[50] > 1e30 and screen.distance[70] > 1e10
    assert np.all(screen.distance[~screen.outlier] < 100)
    assert "too large" in screen.reason(5) and "feature 'x0' is 1e+300" in screen.reason(5)
    assert screen.reason(70).startswith("outlier: squared Mahalanobis distance 1")
    assert "under the closest component (threshold 1e+06); feature 'x0' is 1e+06" in screen.reason(70)


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("value", ABSURD)
def test_regression_refuses_absurd_features_and_targets(where, value):
    """OnlineRegressionMixture refuses an absurd x or y (standardised residual or feature spread); state untouched."""
    model = _warm_regression()
    before = _state(model)
    x, y = ({"x": value}, 3.0) if where == "x" else ({"x": 2.0}, value)
    with pytest.raises(se.OutlierError):
        model.learn_one(x, y)
    assert _state(model) == before


def test_one_huge_value_in_the_warm_up_does_not_wreck_the_fit():
    """A 2**65 among the warm-up records is left out: the means match scikit-learn's fit of the clean records."""
    points = _points(400, seed=3)
    model = se.OnlineGMM(2, batch_size=50, warmup=300, seed=0, outliers="skip")
    frame = _frame(points)
    frame.loc[3, "x0"] = 2.0**65  # among the first records, before any reference exists
    frame.loc[150, "x1"] = 1e6
    model.learn_many(frame)
    assert model.n_outliers == 2 and model.n_seen == 398
    reference = SkGaussianMixture(2, random_state=0).fit(np.delete(points, [3, 150], axis=0)[:298])
    order, expected = np.argsort(model.means_[:, 0]), np.argsort(reference.means_[:, 0])
    np.testing.assert_allclose(model.means_[order], reference.means_[expected], atol=0.15)


def test_warm_up_outlier_raises_in_raise_mode_once_a_reference_exists():
    """During the warm-up, a record 1e6 robust sds from the buffered records raises, and nothing changes."""
    model = se.OnlineGMM(2, batch_size=50, warmup=300, seed=0)
    model.learn_many(_frame(_points(100)))
    before = _state(model)
    with pytest.raises(se.OutlierError, match="warm-up"):
        model.learn_one({"x0": 1e6, "x1": 0.0})
    assert _state(model) == before


def test_clean_gaussian_stream_is_never_refused():
    """2e5 Gaussian records in d=10 (D2 ~ chi2(10), P(D2 > 1e6) < 1e-10**5) are all learned."""
    rng = np.random.default_rng(4)
    d = 10
    points = rng.normal(size=(200_000, d)) + 5.0 * rng.integers(2, size=(200_000, 1))
    model = se.OnlineGMM(2, batch_size=256, warmup=1000, seed=0)
    model.learn_many(pd.DataFrame(points, columns=[f"f{i}" for i in range(d)]))
    assert model.n_outliers == 0 and model.n_seen == 200_000
    # the analytic bound behind the default: far beyond chi2's 1 - 1e-6 quantile for every d <= 100
    assert DEFAULT_THRESHOLD > 1000 * stats.chi2.isf(1e-6, 100)


def test_real_stock_returns_with_10_to_20_sd_days_are_all_learned(stock_returns):
    """The heavy-tailed daily returns of four indices (crash days included) are never refused."""
    model = se.OnlineGMM(2, batch_size=50, warmup=300, seed=0)
    for row in stock_returns:
        model.learn_one(dict(zip(["DAX", "SMI", "CAC", "FTSE"], row.tolist(), strict=True)))
    assert model.n_outliers == 0 and model.n_seen == len(stock_returns)


def test_stream_with_outliers_ends_where_the_clean_stream_ends():
    """After refusing 1e300, 2**65 and 1e6 mid-stream, the model equals the one that never saw them."""
    points = _points(3000, seed=5)
    clean, dirty = (se.OnlineGMM(2, batch_size=50, warmup=200, seed=0) for _ in range(2))
    for i, (a, b) in enumerate(points.tolist()):
        if i in (1000, 1500, 2000):
            with pytest.raises(se.OutlierError):
                dirty.learn_one({"x0": ABSURD[(i - 1000) // 500], "x1": 0.0})
        dirty.learn_one({"x0": a, "x1": b})
        clean.learn_one({"x0": a, "x1": b})
    np.testing.assert_array_equal(dirty.means_, clean.means_)
    order = np.argsort(dirty.means_[:, 0])
    np.testing.assert_allclose(dirty.means_[order], CENTRES, atol=0.2)


@pytest.mark.parametrize("cls", [se.OnlineGMM, se.OnlineRegressionMixture])
def test_outlier_options_round_trip_and_are_checked(cls):
    """outliers / outlier_threshold are stored verbatim, survive to_dict/from_dict, and bad values are refused."""
    model = cls(outliers="skip", outlier_threshold=1e8)
    restored = cls.from_dict(model.to_dict())
    assert (restored.outliers, restored.outlier_threshold) == ("skip", 1e8)
    with pytest.raises(ValueError, match="outliers must be one of"):
        cls(outliers="drop")
    with pytest.raises(ValueError, match="outlier_threshold"):
        cls(outlier_threshold=0)


def test_a_record_with_missing_features_is_judged_on_the_ones_it_has():
    """missing="marginalize": {x0: 1e6, x1: None} raises naming x0; {x0: 5, x1: None} is learned."""
    model = _warm_gmm(missing="marginalize")
    before = _state(model)
    with pytest.raises(se.OutlierError, match="feature 'x0' is 1e\\+06"):
        model.learn_one({"x0": 1e6, "x1": None})
    assert _state(model) == before
    model.learn_one({"x0": 5.0, "x1": None})
    assert model.n_seen == 431 and model.n_outliers == 0


def test_skip_mode_reports_the_rows_it_skipped():
    """learn_many with outliers="skip" lists (position, OutlierError) of each skipped row in skipped_."""
    X, y = _lines(300, seed=1)
    y.iloc[40], y.iloc[260] = 1e6, 1e300
    model = _warm_regression(outliers="skip")
    model.learn_many(X, y)
    assert [position for position, _ in model.skipped_] == [40, 260]
    assert "the target is 1e+06" in str(model.skipped_[0][1]) and "too large" in str(model.skipped_[1][1])
    assert model.n_seen == 430 + 298 and model.n_outliers == 2
    model.learn_one({"x": 1.0}, 2.0)
    assert model.skipped_ == ()


@pytest.mark.parametrize("warm", [False, True])
def test_assign_and_screen_many_is_assign_many_plus_screen_many(warm):
    """The consumer's one-E-step call gives assign_many's numbers bit for bit and screen_many's verdicts."""
    model = _warm_gmm() if warm else se.OnlineGMM(2, batch_size=50, warmup=200, seed=0)
    if not warm:
        model.learn_many(_frame(_points(100)))
    frame = _frame(_points(300, seed=6))
    frame.loc[5, "x0"], frame.loc[50, "x1"], frame.loc[70, "x0"] = ABSURD
    resp, log_likelihood, screen = model.assign_and_screen_many(frame)
    clean = ~screen.outlier
    expected_resp, expected_log_likelihood = model.assign_many(frame[clean])
    np.testing.assert_array_equal(resp[clean], expected_resp)
    np.testing.assert_array_equal(log_likelihood[clean], expected_log_likelihood)
    reference = model.screen_many(frame)
    assert np.flatnonzero(screen.outlier).tolist() == np.flatnonzero(reference.outlier).tolist() == [5, 50, 70]
    np.testing.assert_allclose(screen.distance[clean], reference.distance[clean], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_learn_ones_quick_check_never_lets_an_outlier_through(covariance_type):
    """The ball learn_one checks in C only passes records the full screen passes (rows from 1 to 1e4 sd out)."""
    model = _warm_gmm(covariance_type=covariance_type, outlier_threshold=1e4)
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(4000, 2)) * np.logspace(0, 4, 4000)[:, None]
    passed = np.array([model._quick_pass(row) for row in rows.tolist()])
    refused = model.screen_many(_frame(rows)).outlier
    assert passed.any() and refused.any()
    assert not (passed & refused).any()


def test_regression_quick_check_never_lets_an_outlier_through():
    """OnlineRegressionMixture's ball passes only records its full screen passes."""
    model = _warm_regression(outlier_threshold=1e4)
    rng = np.random.default_rng(8)
    rows = np.array([5.0, 5.0]) + rng.normal(size=(4000, 2)) * np.logspace(0, 4, 4000)[:, None]
    passed = np.array([model._quick_pass(row) for row in rows.tolist()])
    refused = model.screen_many(pd.DataFrame({"x": rows[:, 1]}), pd.Series(rows[:, 0])).outlier
    assert passed.any() and refused.any()
    assert not (passed & refused).any()


# -- a stream that has moved is not locked out; the warm-up's first records are reported ------------------
# Bound used below: with batch_size=B the guard re-warms once more than B // 2 of the last B screened records
# are refused: after a shift learn_one refuses exactly B // 2 + 1 records, learn_many (a mini-batch at a time)
# at most B; `warmup` records later the model is warm on the new level.
SHIFT_BATCH, SHIFT_WARMUP = 50, 200


def _shifted_gmm(before: np.ndarray, after: np.ndarray, one_by_one: bool) -> se.OnlineGMM:
    model = se.OnlineGMM(1, batch_size=SHIFT_BATCH, warmup=SHIFT_WARMUP, seed=0, outliers="skip")
    for block in (before, after):
        if one_by_one:
            for row in block.tolist():
                model.learn_one({"x0": row[0], "x1": row[1]})
        else:
            model.learn_many(_frame(block))
    return model


@pytest.mark.parametrize("one_by_one", [False, True])
def test_a_feature_constant_then_moved_by_one_is_learned_again(one_by_one):
    """Reviewer's repro: x1 exactly 0 for 1,000 records then 1: at most B//2+1 records refused, then the
    model re-warms and its mean of x1 is the new level 1 (x0 ~ N(3, 1) throughout)."""
    rng = np.random.default_rng(5)
    before = np.column_stack([rng.normal(3.0, 1.0, 1000), np.zeros(1000)])
    after = np.column_stack([rng.normal(3.0, 1.0, 1000), np.ones(1000)])
    model = _shifted_gmm(before, after, one_by_one)
    assert model.n_outliers == SHIFT_BATCH // 2 + 1 if one_by_one else 0 < model.n_outliers <= SHIFT_BATCH
    assert model.is_warm
    assert model.means_[0, 1] == pytest.approx(1.0, abs=1e-9)
    assert model.means_[0, 0] == pytest.approx(after[:, 0].mean(), abs=0.15)


@pytest.mark.parametrize("one_by_one", [False, True])
def test_a_precise_sensor_whose_level_moves_by_5000_sd_is_learned_again(one_by_one):
    """Reviewer's repro: sd 0.001 around 2, then around 7: bounded refusals, then the mean is 7 within 0.001."""
    rng = np.random.default_rng(6)
    before = np.column_stack([rng.normal(2.0, 0.001, 1000), rng.normal(0.0, 1.0, 1000)])
    after = np.column_stack([rng.normal(7.0, 0.001, 1000), rng.normal(0.0, 1.0, 1000)])
    model = _shifted_gmm(before, after, one_by_one)
    assert model.n_outliers == SHIFT_BATCH // 2 + 1 if one_by_one else 0 < model.n_outliers <= SHIFT_BATCH
    assert model.means_[0, 0] == pytest.approx(7.0, abs=1e-3)


def test_regression_whose_precise_feature_moves_is_learned_again():
    """A regression feature with sd 0.001 at 2, then at 7: bounded refusals, then it is learned again: the
    running spread's mean of x is 7 and the slope on z is still 0.5."""
    rng = np.random.default_rng(7)
    x = np.concatenate([np.full(1000, 2.0), np.full(1000, 7.0)]) + rng.normal(0.0, 0.001, 2000)
    z = rng.uniform(0, 10, 2000)
    y = 0.5 * z + 1.0 + rng.normal(0.0, 0.1, 2000)
    model = se.OnlineRegressionMixture(1, batch_size=SHIFT_BATCH, warmup=SHIFT_WARMUP, seed=0, outliers="skip")
    model.learn_many(pd.DataFrame({"x": x[:1000], "z": z[:1000]}), pd.Series(y[:1000]))
    model.learn_many(pd.DataFrame({"x": x[1000:], "z": z[1000:]}), pd.Series(y[1000:]))
    assert 0 < model.n_outliers <= SHIFT_BATCH
    assert model.is_warm
    assert model._running_spread()[0][1 + model.feature_names_.index("x")] == pytest.approx(7.0, abs=1e-3)
    assert model.coef_[0, model.feature_names_.index("z")] == pytest.approx(0.5, abs=0.02)


def test_isolated_absurd_records_do_not_trigger_the_moved_stream_escape():
    """One absurd record in every 10 (1e6, 2**65 in a N(0,1)/N(6,1) stream): each refused, none learned."""
    model = _warm_gmm(outliers="skip")
    points = _points(1000, seed=9)
    points[::10, 0] = np.where(np.arange(100) % 2 == 0, 1e6, 2.0**65)
    model.learn_many(_frame(points))
    assert model.n_outliers == 100
    order = np.argsort(model.means_[:, 0])
    np.testing.assert_allclose(model.means_[order], CENTRES, atol=0.15)


def test_a_burst_of_absurd_records_costs_a_re_warm_but_is_never_learned():
    """30 records of 1e6 in a row (more than half a window: taken for a move): all 30 reported as skipped,
    left out of the new warm-up fit, and the model ends on the true centres."""
    model = _warm_gmm(outliers="skip")
    points = np.vstack([np.tile([[1e6, 0.0]], (30, 1)), _points(1000, seed=13)])
    model.learn_many(_frame(points))
    assert [position for position, _ in model.skipped_] == list(range(30))
    assert model.n_outliers == 30 and model.n_seen == 430 + 1000
    order = np.argsort(model.means_[:, 0])
    np.testing.assert_allclose(model.means_[order], CENTRES, atol=0.15)


def test_a_warm_up_outlier_among_the_first_20_records_is_reported_in_skipped():
    """Reviewer's repro: a=1e5 at position 3 of a fresh model's first 100 records is in skipped_ (not silently
    dropped at the warm-up fit)."""
    points = _points(100, seed=11)
    points[3, 0] = 1e5
    model = se.OnlineGMM(2, batch_size=50, warmup=60, seed=0, outliers="skip")
    model.learn_many(_frame(points))
    assert [position for position, _ in model.skipped_] == [3]
    assert model.n_outliers == 1 and model.n_seen == 99
    assert model.screen_many(_frame(points)).outlier.tolist() == [i == 3 for i in range(100)]


@pytest.mark.parametrize("one_by_one", [False, True])
def test_a_record_left_out_of_the_warm_up_fit_is_reported_by_the_call_that_fits(one_by_one):
    """warmup=10 (fewer than the 20 records a reference needs): a=1e5 among them is left out of the fit
    and reported in skipped_ by the call that fits (the frame's position; 0 for learn_one)."""
    points = _points(10, seed=12)
    points[3, 0] = 1e5
    model = se.OnlineGMM(2, batch_size=50, warmup=10, seed=0, outliers="skip")
    if one_by_one:
        reported = []
        for i, row in enumerate(points.tolist()):
            model.learn_one({"x0": row[0], "x1": row[1]})
            reported += [(i, position) for position, _ in model.skipped_]
        assert reported == []  # a=1e5 came with call 3, the fit came with call 9: only logged
    else:
        model.learn_many(_frame(points))
        assert [position for position, _ in model.skipped_] == [3]
        assert "squared robust distance" in str(model.skipped_[0][1])
    assert model.n_outliers == 1 and model.n_seen == 9


@pytest.mark.parametrize(
    ("y", "error", "message"),
    [
        ([1.0, "2.5", 3.0], TypeError, "target is not a number: '2.5'"),
        ([1.0, None, 3.0], TypeError, "target is not a number: None"),
        ([1.0, np.nan, 3.0], ValueError, "target is NaN"),
        ([1.0, np.inf, 3.0], ValueError, "target is infinite"),
    ],
)
def test_regression_targets_checked_in_one_pass_still_name_the_problem(y, error, message):
    """screen_many / learn_many check targets vectorised, yet a text, None, NaN or inf target raises as before."""
    model = _warm_regression()
    X = pd.DataFrame({"x": [1.0, 2.0, 3.0]})
    for call in (model.screen_many, model.learn_many):
        with pytest.raises(error, match=message.replace("(", r"\(")):
            call(X, pd.Series(y, dtype=object if isinstance(y[1], str) or y[1] is None else float))
    assert model.screen_many(X, pd.Series([1.0, 2, True])).outlier.tolist() == [False, False, False]


@pytest.mark.parametrize("missing", [False, True])
def test_warm_up_reference_is_the_median_and_scaled_mad_of_each_column(missing):
    """robust_reference: each column's median and 1.4826 MAD (scipy's normal-scaled MAD), NaN ignored."""
    from streamem.outliers import robust_reference

    rng = np.random.default_rng(11)
    for n in (20, 21, 40, 80):
        rows = rng.standard_t(3, size=(n, 3)) * [1.0, 50.0, 1e-3] + [0.0, -7.0, 1e4]
        if missing:
            rows[rng.random(rows.shape) < 0.15] = np.nan
        centre, scale = robust_reference(rows)
        np.testing.assert_allclose(centre, [np.median(c[~np.isnan(c)]) for c in rows.T], rtol=1e-15)
        mad = stats.median_abs_deviation(rows, axis=0, scale="normal", nan_policy="omit")
        np.testing.assert_allclose(scale, 1.4826 * mad * stats.norm.ppf(0.75), rtol=1e-12)  # 1.4826 MAD


@pytest.mark.parametrize("n", [20, 21, 40, 80, 161])
def test_the_robust_reference_is_the_median_and_scaled_mad_of_each_column(n):
    """`robust_reference` (median, then 1.4826 MAD, else 1.2533 mean absolute deviation, else max(|median|, 1))
    equals NumPy's and SciPy's statistics, exactly, with and without a missing value, for an odd and an even
    number of rows, tied values, a column constant but for one value, and a constant column."""
    from streamem.outliers import robust_reference

    rng = np.random.default_rng(n)
    rows = np.column_stack([rng.normal(size=n), rng.integers(0, 3, size=n).astype(float), np.full(n, 4.0),
                            np.full(n, -7.5)])
    rows[0, 3] = 2.0  # the MAD is 0, the mean absolute deviation is not
    for missing in (False, True):
        if missing:
            rows[3, 0] = rows[5, 1] = np.nan
        centre, scale = robust_reference(rows)
        median = np.nanmedian(rows, axis=0)
        mad = stats.median_abs_deviation(rows, axis=0, nan_policy="omit", scale=1 / 1.4826)
        mean_deviation = 1.2533 * np.nanmean(np.abs(rows - median), axis=0)
        expected = np.where(mad > 0, mad, np.where(mean_deviation > 0, mean_deviation, np.maximum(abs(median), 1)))
        np.testing.assert_array_equal(centre, median)
        np.testing.assert_allclose(scale, expected, rtol=1e-15)
        assert scale[2] == 4.0 and scale[3] == pytest.approx(1.2533 * 9.5 / n)
