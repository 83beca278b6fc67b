"""MarkovSwitchingRegression: published Markov-switching fits (Stata, via statsmodels' tests), a NumPy forward
algorithm and brute-force Viterbi at fixed parameters, the one-step forecast, bad input."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import pathlib
import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import streamem as se
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


# -- published Markov-switching fits ---------------------------------------------------------------------------------
# Reference values are Stata's (statsmodels' own tests, from the Stata 14 manual "mswitch"). Stata and statsmodels
# start every series in the chain's stationary distribution; here the start distribution is free, a superset of
# models, so our maximum likelihood must be at least theirs. The extra freedom only moves the first record's regime
# (from the stationary distribution to certainty), which gains at most about -log(stationary probability of that
# regime) at fixed parameters (0.3 nats here) and moves the estimates by a small fraction of their standard errors:
# the parameters are compared in units of Stata's published standard errors (bse_oim).


def _statsmodels_series(name: str) -> np.ndarray:
    """A data series of statsmodels' Markov-regression tests (`fedfunds`, `areturns`), read from the module's source:
    importing that test module under pytest fails on its unregistered `smoke` marker (--strict-markers)."""
    spec = importlib.util.find_spec("statsmodels.tsa.regime_switching.tests.test_markov_regression")
    tree = ast.parse(pathlib.Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return np.asarray(ast.literal_eval(node.value), dtype=float)
    raise LookupError(name)  # pragma: no cover - statsmodels moved its data


def _fedfunds() -> np.ndarray:
    """The Fed funds rate, 1954Q3-2010Q4 (226 quarters)."""
    series = _statsmodels_series("fedfunds")
    assert series.shape == (226,)
    return series


def _in_standard_errors(ours, reference, standard_errors) -> np.ndarray:
    return np.abs(np.asarray(ours) - np.asarray(reference)) / np.asarray(standard_errors)


def test_fedfunds_ar1_shared_variance_matches_stata():
    """Fed funds AR(1), switching intercept and slope, one variance: log-likelihood >= Stata's -264.71069 and within
    0.1 (measured +0.048), every parameter within 0.1 of Stata's standard errors (measured <= 0.08), and statsmodels'
    own fit agrees with Stata."""
    import statsmodels.api as sm

    f = _fedfunds()
    X, y = f[:-1, None], f[1:]
    msr = se.MarkovSwitchingRegression(2, switching_variance=False, tol=1e-10, max_iter=10_000).fit(X, y)
    reference_llf = -264.71069
    gain = msr.score(X, y) - reference_llf
    assert -1e-6 <= gain < 0.1
    k = np.argsort(-msr.intercept_)  # Stata's regime 0 has the higher intercept (0.724 against -0.099)
    ours = [msr.transmat_[k[0], k[0]], msr.transmat_[k[1], k[0]], *msr.intercept_[k], *msr.coef_[k, 0]]
    stata = [0.6378175, 0.1306295, 0.724457, -0.0988764, 0.7631424, 1.061174]
    bse = [0.1202616, 0.0495924, 0.2886657, 0.1183838, 0.0337234, 0.0185031]
    assert np.all(_in_standard_errors(ours, stata, bse) < 0.1)
    np.testing.assert_allclose(msr.noise_variance_, np.full(2, 0.6915759**2), rtol=2e-3)  # measured 7e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sm.tsa.MarkovRegression(y, k_regimes=2, exog=X[:, 0]).fit(disp=False)
    np.testing.assert_allclose(theirs.llf, reference_llf, atol=1e-5)
    assert msr.score(X, y) >= theirs.llf - 1e-6
    assert np.all(_in_standard_errors(ours, theirs.params[:6], bse) < 0.1)


def test_fedfunds_ar1_switching_variance_against_statsmodels():
    """Fed funds AR(1) with a variance per regime: at least statsmodels' default fit (a worse local optimum,
    -277.10), and statsmodels started from our estimate stays at the same optimum (log-likelihood within 0.5,
    measured 0.18 below ours; parameters within 0.05, measured <= 0.031)."""
    import statsmodels.api as sm

    f = _fedfunds()
    X, y = f[:-1, None], f[1:]
    msr = se.MarkovSwitchingRegression(2, switching_variance=True, tol=1e-10, max_iter=10_000).fit(X, y)
    model = sm.tsa.MarkovRegression(y, k_regimes=2, exog=X[:, 0], switching_variance=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = model.fit(disp=False)
        k = np.argsort(-msr.intercept_)
        ours = np.r_[
            msr.transmat_[k[0], k[0]],
            msr.transmat_[k[1], k[0]],
            msr.intercept_[k],
            msr.coef_[k, 0],
            msr.noise_variance_[k],
        ]
        restarted = model.fit(start_params=ours, disp=False)
    assert msr.score(X, y) >= default.llf - 1e-6
    assert 0.0 <= msr.score(X, y) - restarted.llf < 0.5
    np.testing.assert_allclose(restarted.params, ours, atol=0.05)


def test_areturns_ar1_switching_variance_matches_stata():
    """Stata's switching-variance AR(1) on the areturns series: log-likelihood >= -745.7977 and within 0.5 (measured
    +0.26), every parameter within 0.1 of Stata's standard errors (measured <= 0.05), the two sigmas within 1%."""
    a = _statsmodels_series("areturns")
    X, y = a[:-1, None], a[1:]
    msr = se.MarkovSwitchingRegression(2, tol=1e-10, max_iter=10_000).fit(X, y)
    gain = msr.score(X, y) - -745.7977
    assert -1e-6 <= gain < 0.5
    k = np.argsort(msr.intercept_)  # Stata's regime 0 has the lower intercept (0.764 against 1.973)
    ours = [msr.transmat_[k[0], k[0]], msr.transmat_[k[1], k[0]], *msr.intercept_[k], *msr.coef_[k, 0]]
    stata = [0.7530865, 0.6825357, 0.7641424, 1.972771, 0.0790744, 0.527953]
    bse = [0.0634387, 0.0662574, 0.0782852, 0.2784204, 0.0301862, 0.0857841]
    assert np.all(_in_standard_errors(ours, stata, bse) < 0.1)
    np.testing.assert_allclose(np.sqrt(msr.noise_variance_[k]), [0.5895792, 1.605333], rtol=0.01)


def test_gaussian_hmm_fedfunds_switching_mean_matches_stata():
    """GaussianHMM(covariance_type="tied") on the Fed funds rate is Stata's switching-mean model: log-likelihood
    >= -508.63592 and within 0.5 (measured +0.33: the chain starts in regime 0 with certainty instead of its
    stationary 0.74, log(1/0.74) = 0.30), parameters within 0.25 of Stata's standard errors (measured <= 0.16),
    the variance within 0.1%."""
    f = _fedfunds()[:, None]
    hmm = se.GaussianHMM(2, covariance_type="tied", tol=1e-10, max_iter=10_000).fit(f)
    gain = hmm.score(f) - -508.63592
    assert -1e-6 <= gain < 0.5
    k = np.argsort(hmm.means_[:, 0])
    ours = [hmm.transmat_[k[0], k[0]], hmm.transmat_[k[1], k[0]], *hmm.means_[k, 0]]
    stata = [0.9820939, 0.0503587, 3.70877, 9.556793]
    bse = [0.0104002, 0.0268434, 0.1767083, 0.2999889]
    assert np.all(_in_standard_errors(ours, stata, bse) < 0.25)
    np.testing.assert_allclose(hmm.covariances_.ravel(), [2.107562**2], rtol=1e-3)


# -- fixed parameters: NumPy forward algorithm, statsmodels' filter, brute-force Viterbi ---------------------------

START = np.array([0.3, 0.7])
TRANSMAT = np.array([[0.9, 0.1], [0.2, 0.8]])
COEF = np.array([[0.5, -1.0], [-1.0, 2.0]])
INTERCEPT = np.array([0.1, 1.0])
VARIANCE = np.array([0.5, 2.0])


def _fixed(startprob=START, **kwargs) -> se.MarkovSwitchingRegression:
    settings = dict(
        max_iter=0,
        startprob_init=startprob,
        transmat_init=TRANSMAT,
        coef_init=COEF,
        intercept_init=INTERCEPT,
        noise_variance_init=VARIANCE,
    )
    return se.MarkovSwitchingRegression(2, **{**settings, **kwargs})


def _records(T: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(T, 2))
    states = (np.cumsum(rng.random(T) < 0.15) % 2).astype(int)
    y = np.einsum("td,td->t", X, COEF[states]) + INTERCEPT[states] + rng.normal(size=T) * np.sqrt(VARIANCE[states])
    return X, y


def _numpy_forward(X, y, startprob, lengths):
    """Log-space forward algorithm, sequence by sequence: (log-likelihood, filtered (T, K), predicted (T, K))."""
    lines = X @ COEF.T + INTERCEPT
    log_b = stats.norm.logpdf(y[:, None], lines, np.sqrt(VARIANCE))
    total, filtered, predicted = 0.0, [], []
    for rows in np.split(np.arange(len(y)), np.cumsum(lengths)[:-1]):
        prior = startprob
        for t in rows:
            joint = np.log(prior) + log_b[t]
            norm = logsumexp(joint)
            total += norm
            predicted.append(prior)
            filtered.append(np.exp(joint - norm))
            prior = filtered[-1] @ TRANSMAT
    return total, np.array(filtered), np.array(predicted)


def test_score_filter_and_forecast_are_the_forward_algorithm():
    """At fixed parameters and over three sequences, score, filter_proba and predict_mean equal a log-space NumPy
    forward algorithm (the forecast: the predicted regime probabilities times each regime's line)."""
    X, y = _records(60)
    lengths = [25, 1, 34]
    msr = _fixed().fit(X, y)
    total, filtered, predicted = _numpy_forward(X, y, START, lengths)
    np.testing.assert_allclose(msr.score(X, y, lengths), total, rtol=1e-12)
    np.testing.assert_allclose(msr.filter_proba(X, y, lengths), filtered, rtol=1e-10, atol=1e-14)
    forecast = np.einsum("tk,tk->t", predicted, X @ COEF.T + INTERCEPT)
    np.testing.assert_allclose(msr.predict_mean(X, y, lengths), forecast, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(msr.predict_components(X), X @ COEF.T + INTERCEPT, rtol=1e-14)


def test_fixed_parameters_match_statsmodels_filter_and_smoother():
    """Started in the chain's stationary distribution (statsmodels' assumption), score, filter_proba, predict_proba
    and predict_mean equal statsmodels' MarkovRegression filter, smoother and predict(probabilities="predicted")."""
    import statsmodels.api as sm

    values, vectors = np.linalg.eig(TRANSMAT.T)
    stationary = np.real(vectors[:, np.argmax(np.real(values))])
    stationary /= stationary.sum()
    X, y = _records(80, seed=1)
    msr = _fixed(startprob=stationary).fit(X, y)
    model = sm.tsa.MarkovRegression(y, k_regimes=2, exog=X, switching_variance=True)
    params = np.r_[TRANSMAT[0, 0], TRANSMAT[1, 0], INTERCEPT, COEF[:, 0], COEF[:, 1], VARIANCE]
    assert model.param_names == [
        "p[0->0]",
        "p[1->0]",
        "const[0]",
        "const[1]",
        "x1[0]",
        "x1[1]",
        "x2[0]",
        "x2[1]",
        "sigma2[0]",
        "sigma2[1]",
    ]
    smoothed = model.smooth(params)
    np.testing.assert_allclose(msr.score(X, y), smoothed.llf, rtol=1e-12)
    np.testing.assert_allclose(msr.filter_proba(X, y), smoothed.filtered_marginal_probabilities, atol=1e-12)
    np.testing.assert_allclose(msr.predict_proba(X, y), smoothed.smoothed_marginal_probabilities, atol=1e-12)
    np.testing.assert_allclose(msr.predict_mean(X, y), smoothed.predict(probabilities="predicted"), atol=1e-12)


def test_forecast_of_a_target_does_not_use_it():
    """predict_mean at t ignores y_t (the one-step forecast) but moves at t + 1 when y_t changes."""
    X, y = _records(20, seed=2)
    msr = _fixed().fit(X, y)
    changed = y.copy()
    changed[10] += 5.0
    before, after = msr.predict_mean(X, y), msr.predict_mean(X, changed)
    np.testing.assert_array_equal(before[:11], after[:11])
    assert abs(before[11] - after[11]) > 1e-3


def test_viterbi_is_the_best_of_all_paths():
    """On T=8, K=2 the Viterbi path is the best of the 256 state paths, each scored by its joint log-probability."""
    X, y = _records(8, seed=3)
    msr = _fixed().fit(X, y)
    log_b = stats.norm.logpdf(y[:, None], X @ COEF.T + INTERCEPT, np.sqrt(VARIANCE))

    def joint(path):
        moves = sum(np.log(TRANSMAT[a, b]) for a, b in zip(path[:-1], path[1:]))
        return np.log(START[path[0]]) + moves + sum(log_b[t, s] for t, s in enumerate(path))

    scores = {path: joint(path) for path in itertools.product(range(2), repeat=8)}
    best = max(scores, key=scores.get)
    assert sorted(scores.values())[-2] < scores[best] - 1e-9  # one best path, so the comparison is meaningful
    np.testing.assert_array_equal(msr.predict(X, y), best)


# -- fitting ----------------------------------------------------------------------------------------------------------


def test_recovers_simulated_regimes_over_several_sequences():
    """Simulated regimes over three sequences: lines, variances and the transition matrix are recovered."""
    X, y = _records(6000, seed=4)
    msr = se.MarkovSwitchingRegression(2, random_state=0).fit(X, y, lengths=[2000, 2000, 2000])
    k = np.argsort(msr.coef_[:, 0])[::-1]  # state 0 has the larger first slope (0.5 against -1)
    np.testing.assert_allclose(msr.coef_[k], COEF, atol=0.06)
    np.testing.assert_allclose(msr.intercept_[k], INTERCEPT, atol=0.06)
    np.testing.assert_allclose(msr.noise_variance_[k], VARIANCE, rtol=0.08)
    np.testing.assert_allclose(msr.transmat_[np.ix_(k, k)], [[0.85, 0.15], [0.15, 0.85]], atol=0.03)


@pytest.mark.parametrize("switching_variance", [True, False])
def test_a_state_never_visited_keeps_its_parameters(switching_variance):
    """A state the chain cannot reach (start and transitions 0) keeps its line, its row of the transition matrix and,
    with switching variance, its variance; nothing is NaN."""
    X, y = _records(200, seed=5)
    variance = VARIANCE if switching_variance else np.full(2, 1.0)
    msr = se.MarkovSwitchingRegression(
        2,
        switching_variance=switching_variance,
        max_iter=5,
        startprob_init=[1.0, 0.0],
        transmat_init=[[1.0, 0.0], [0.5, 0.5]],
        coef_init=COEF,
        intercept_init=INTERCEPT,
        noise_variance_init=variance,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        msr.fit(X, y)
    np.testing.assert_array_equal(msr.coef_[1], COEF[1])
    np.testing.assert_array_equal(msr.intercept_[1], INTERCEPT[1])
    np.testing.assert_array_equal(msr.transmat_[1], [0.5, 0.5])
    if switching_variance:
        assert msr.noise_variance_[1] == VARIANCE[1]
    else:
        assert msr.noise_variance_[0] == msr.noise_variance_[1]
    fitted = [msr.coef_, msr.intercept_, msr.noise_variance_, msr.transmat_, msr.startprob_]
    assert all(np.all(np.isfinite(a)) for a in fitted)
    assert np.isfinite(msr.score(X, y))


def test_shared_variance_stays_shared_and_counts_one_parameter():
    """switching_variance=False: one variance for all states after fitting, and the BIC counts it once."""
    X, y = _records(500, seed=6)
    shared = se.MarkovSwitchingRegression(2, switching_variance=False, random_state=0).fit(X, y)
    assert shared.noise_variance_[0] == shared.noise_variance_[1]
    # 2 lines of 3, 1 variance, 1 free start probability, 2 free transition probabilities
    np.testing.assert_allclose(shared.bic(X, y), -2 * shared.score(X, y) + 10 * np.log(500), rtol=1e-12)
    np.testing.assert_allclose(shared.aic(X, y), -2 * shared.score(X, y) + 20, rtol=1e-12)


def test_one_iteration_is_summarize_then_apply():
    """apply(summarize(X, y).statistics) is one Baum-Welch iteration: it equals a fit with max_iter=1 more."""
    X, y = _records(300, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        two = _fixed(max_iter=2).fit(X, y)
        one = _fixed(max_iter=1).fit(X, y)
    one.apply(one.summarize(X, y).statistics)
    for name in ("coef_", "intercept_", "noise_variance_", "transmat_", "startprob_"):
        np.testing.assert_allclose(getattr(one, name), getattr(two, name), rtol=1e-12)


# -- bad input ---------------------------------------------------------------------------------------------------------


def _bad_inputs():
    X, y = _records(10, seed=8)
    nan_X = X.copy()
    nan_X[3, 1] = np.nan
    nan_y = y.copy()
    nan_y[2] = np.nan
    text_X = X.astype(object)
    text_X[4, 0] = "high"
    text_y = y.astype(object)
    text_y[5] = "n/a"
    return [
        ((nan_X, y, None), r"X contains a NaN value at row 3, column 1"),
        ((text_X, y, None), r"X contains non-numeric values"),
        ((X, nan_y, None), r"y contains a NaN value at row 2"),
        ((X, text_y, None), r"y contains non-numeric values"),
        ((X, y[:-1], None), r"y has 9 values but X has 10 samples"),
        ((X, y, [4, 5]), r"lengths sum to 9, but X has 10 records"),
        ((X, y, [10, 0]), r"lengths must all be positive"),
    ]


@pytest.mark.parametrize("method", ["fit", "score", "predict", "predict_proba", "filter_proba", "predict_mean"])
def test_bad_input_is_refused_and_leaves_the_model_as_it_was(method):
    """NaN or text in X or y, y of the wrong length, lengths that do not sum or hold a zero: ValueError naming it,
    and the fitted model answers exactly as before."""
    X, y = _records(50, seed=9)
    msr = se.MarkovSwitchingRegression(2, random_state=0).fit(X, y)
    before = {name: np.copy(getattr(msr, name)) for name in _FITTED}
    answer = msr.predict_mean(X, y)
    for (bad_X, bad_y, lengths), message in _bad_inputs():
        with pytest.raises(ValueError, match=message):
            getattr(msr, method)(bad_X, bad_y, lengths)
        for name in _FITTED:
            np.testing.assert_array_equal(getattr(msr, name), before[name])
        np.testing.assert_array_equal(msr.predict_mean(X, y), answer)


_FITTED = ("coef_", "intercept_", "noise_variance_", "startprob_", "transmat_", "n_features_in_", "n_iter_")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"coef_init": COEF}, "coef_init and intercept_init must be given together"),
        ({"coef_init": COEF[:1], "intercept_init": INTERCEPT}, "coef_init must have 2 rows"),
        ({"coef_init": COEF, "intercept_init": [0.0, np.nan]}, "intercept_init must be 2 finite numbers"),
        ({"noise_variance_init": [1.0, -1.0]}, "noise_variance_init must be > 0"),
        ({"noise_variance_init": [1.0, 2.0], "switching_variance": False}, "must be one value when switching_var"),
        ({"switching_variance": "yes"}, "switching_variance must be True or False"),
        ({"init": "kmeans"}, "init must be one of"),
        ({"transmat_init": [[0.5, 0.6], [0.5, 0.5]]}, "every row of transmat must sum to 1"),
    ],
)
def test_bad_settings_are_refused(arguments, message):
    """Starting values and settings of the wrong shape or kind raise ValueError naming the setting."""
    X, y = _records(30, seed=10)
    with pytest.raises(ValueError, match=message):
        se.MarkovSwitchingRegression(2, **arguments).fit(X, y)


def test_lines_given_without_variances_start_from_the_nearest_line():
    """coef_init and intercept_init alone: the starting variance is the mean squared residual from the nearest line."""
    X, y = _records(100, seed=11)
    msr = se.MarkovSwitchingRegression(
        2, max_iter=0, coef_init=COEF, intercept_init=INTERCEPT, reg_noise=1e-6, switching_variance=False
    ).fit(X, y)
    nearest = np.min((y[:, None] - (X @ COEF.T + INTERCEPT)) ** 2, axis=1).mean()
    np.testing.assert_allclose(msr.noise_variance_, np.full(2, nearest + 1e-6), rtol=1e-12)


@pytest.mark.parametrize("method", ["score", "predict", "predict_proba", "filter_proba", "predict_mean"])
def test_an_unfitted_model_says_so(method):
    """Inference before fit raises NotFittedError naming the model."""
    X, y = _records(10, seed=12)
    with pytest.raises(se.NotFittedError, match="MarkovSwitchingRegression is not fitted"):
        getattr(se.MarkovSwitchingRegression(2), method)(X, y)
