"""GaussianHMM against hmmlearn (the reference), closed forms and brute force."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings

import numpy as np
import pytest
from hmmlearn import _hmmc
from hmmlearn import hmm as hmmlearn_hmm

import streamem as se
from streamem.state import StateError

COVARIANCE_TYPES = ["full", "diag", "spherical", "tied"]
LENGTHS = [700, 1100, 400, 300]  # several sequences, as hmmlearn's `lengths`


def sticky_reference(n_states: int = 3, n_features: int = 2, seed: int = 0):
    """An hmmlearn model with persistent states and distinct means and covariances."""
    rng = np.random.default_rng(seed)
    model = hmmlearn_hmm.GaussianHMM(n_states, "full", init_params="")
    model.startprob_ = rng.dirichlet(np.ones(n_states))
    model.transmat_ = 0.3 * rng.dirichlet(3 * np.ones(n_states), size=n_states) + 0.7 * np.eye(n_states)
    model.means_ = 2.0 * rng.normal(size=(n_states, n_features))
    model.covars_ = np.array([np.eye(n_features) * (0.5 + k) + 0.2 for k in range(n_states)])
    model.n_features = n_features  # set by hmmlearn's fit otherwise
    return model


def sampled(n_records: int = sum(LENGTHS), seed: int = 1, **kwargs) -> np.ndarray:
    return sticky_reference(**kwargs).sample(n_records, random_state=seed)[0]


def start_for(covariance_type: str, n_states: int = 3, n_features: int = 2, seed: int = 5) -> dict:
    """One arbitrary start, given to both libraries."""
    rng = np.random.default_rng(seed)
    eye = np.eye(n_features)
    return {
        "startprob": rng.dirichlet(np.ones(n_states)),
        "transmat": rng.dirichlet(np.ones(n_states), size=n_states),
        "means": rng.normal(size=(n_states, n_features)),
        "covariances": {
            "full": np.array([eye * (1.0 + 0.5 * k) for k in range(n_states)]),
            "diag": np.ones((n_states, n_features)) + np.arange(n_states)[:, None],
            "spherical": 1.0 + np.arange(n_states, dtype=float),
            "tied": eye * 1.5,
        }[covariance_type],
    }


def hmmlearn_from(covariance_type: str, start: dict, n_iter: int) -> hmmlearn_hmm.GaussianHMM:
    """hmmlearn's GaussianHMM as plain maximum likelihood (no covariance prior or floor)."""
    model = hmmlearn_hmm.GaussianHMM(
        len(start["startprob"]), covariance_type, init_params="", n_iter=n_iter, tol=0, covars_prior=0, min_covar=0
    )
    model.n_features = start["means"].shape[1]  # set by hmmlearn's fit otherwise
    model.startprob_, model.transmat_ = start["startprob"], start["transmat"]
    model.means_, model.covars_ = start["means"], start["covariances"]
    return model


def streamem_from(covariance_type: str, start: dict, max_iter: int) -> se.GaussianHMM:
    return se.GaussianHMM(
        len(start["startprob"]),
        covariance_type,
        max_iter=max_iter,
        tol=0,
        reg_covar=0,
        startprob_init=start["startprob"],
        transmat_init=start["transmat"],
        means_init=start["means"],
        covariances_init=start["covariances"],
    )


def hmmlearn_covariances(model: hmmlearn_hmm.GaussianHMM) -> np.ndarray:
    """hmmlearn's covariances in GaussianMixture's shapes (its `covars_` expands them to full)."""
    return {"full": model.covars_, "tied": model.covars_[0], "diag": model._covars_}.get(
        model.covariance_type, model._covars_[:, 0] if model._covars_.ndim == 2 else model._covars_
    )


# -- Baum-Welch against hmmlearn ------------------------------------------------------------
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_baum_welch_matches_hmmlearn(covariance_type):
    """From the same start, 8 iterations over four sequences give hmmlearn's log-likelihoods and parameters."""
    X = sampled()
    start = start_for(covariance_type)
    reference = hmmlearn_from(covariance_type, start, n_iter=8).fit(X, LENGTHS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)  # tol=0: it runs out of iterations by design
        ours = streamem_from(covariance_type, start, max_iter=8).fit(X, LENGTHS)
    assert ours.n_iter_ == 8
    np.testing.assert_allclose(ours.log_likelihoods_, reference.monitor_.history, rtol=1e-10)
    np.testing.assert_allclose(ours.startprob_, reference.startprob_, atol=1e-9)
    np.testing.assert_allclose(ours.transmat_, reference.transmat_, atol=1e-9)
    np.testing.assert_allclose(ours.means_, reference.means_, atol=1e-9)
    np.testing.assert_allclose(ours.covariances_, hmmlearn_covariances(reference), atol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_inference_at_fixed_parameters_matches_hmmlearn(covariance_type):
    """With max_iter=0 the start is the model: score, smoothed posteriors, Viterbi and filtered probabilities
    equal hmmlearn's at the same parameters."""
    X = sampled(seed=2)
    start = start_for(covariance_type, seed=7)
    reference = hmmlearn_from(covariance_type, start, n_iter=1)
    ours = streamem_from(covariance_type, start, max_iter=0).fit(X, LENGTHS)
    assert ours.n_iter_ == 0 and ours.log_likelihoods_ == []
    np.testing.assert_allclose(ours.transmat_, start["transmat"])
    assert ours.score(X, LENGTHS) == pytest.approx(reference.score(X, LENGTHS), rel=1e-12)
    np.testing.assert_allclose(ours.predict_proba(X, LENGTHS), reference.predict_proba(X, LENGTHS), atol=1e-10)
    np.testing.assert_array_equal(ours.predict(X, LENGTHS), reference.predict(X, LENGTHS))
    # hmmlearn's scaled forward pass holds the filtered probabilities (its forward lattice)
    frames = np.exp(reference._compute_log_likelihood(X))
    filtered, bounds = ours.filter_proba(X, LENGTHS), np.cumsum([0] + LENGTHS)
    for begin, end in itertools.pairwise(bounds):
        _, lattice, _ = _hmmc.forward_scaling(reference.startprob_, reference.transmat_, frames[begin:end])
        np.testing.assert_allclose(filtered[begin:end], lattice, atol=1e-10)


def test_bic_and_aic_count_parameters_as_hmmlearn():
    """BIC and AIC equal hmmlearn's for every covariance type (same log-likelihood, same parameter count)."""
    X = sampled(seed=3)
    for covariance_type in COVARIANCE_TYPES:
        start = start_for(covariance_type)
        reference = hmmlearn_from(covariance_type, start, n_iter=1)
        ours = streamem_from(covariance_type, start, max_iter=0).fit(X, LENGTHS)
        assert ours.bic(X, LENGTHS) == pytest.approx(reference.bic(X, LENGTHS), rel=1e-10)
        assert ours.aic(X, LENGTHS) == pytest.approx(reference.aic(X, LENGTHS), rel=1e-10)


def test_viterbi_is_the_most_likely_path_by_enumeration():
    """On 8 records the Viterbi path is the best of all 2^8 paths, scored by hand."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(8, 1)) * 2.0
    start = {
        "startprob": np.array([0.6, 0.4]),
        "transmat": np.array([[0.8, 0.2], [0.3, 0.7]]),
        "means": np.array([[-1.0], [1.5]]),
        "covariances": np.array([1.0, 2.0]),
    }
    model = streamem_from("spherical", start, max_iter=0).fit(X)
    means, variances = start["means"][:, 0], start["covariances"]

    def log_joint(path):
        total = np.log(start["startprob"][path[0]])
        total += sum(np.log(start["transmat"][a, b]) for a, b in itertools.pairwise(path))
        x = X[:, 0]
        return total + np.sum(-0.5 * np.log(2 * np.pi * variances[list(path)]) - (x - means[list(path)]) ** 2 / (
            2 * variances[list(path)]
        ))

    best = max(itertools.product([0, 1], repeat=8), key=log_joint)
    assert model.predict(X).tolist() == list(best)


def test_a_long_sequence_never_underflows():
    """T = 10^6 in one sequence: a finite log-likelihood equal to hmmlearn's, posteriors that sum to one."""
    reference = sticky_reference(n_states=2, n_features=1, seed=6)
    rng = np.random.default_rng(0)
    regimes = np.repeat(rng.integers(2, size=1000), 1000)  # 1,000 regimes of 1,000 records
    X = rng.normal(reference.means_[regimes, 0], np.sqrt(reference.covars_[regimes, 0, 0]))[:, None]
    start = {
        "startprob": reference.startprob_,
        "transmat": reference.transmat_,
        "means": reference.means_,
        "covariances": reference.covars_[:, 0, 0],
    }
    ours = streamem_from("spherical", start, max_iter=0).fit(X)
    expected = hmmlearn_from("spherical", start, n_iter=1).score(X)
    assert np.isfinite(expected) and ours.score(X) == pytest.approx(expected, rel=1e-9)
    posterior = ours.predict_proba(X)
    assert np.all(np.isfinite(posterior)) and np.allclose(posterior.sum(axis=1), 1.0)


def test_a_zero_in_the_transition_matrix_is_followed():
    """Records that favour a state the chain cannot reach: finite log-likelihood, and no probability on it."""
    X = np.array([[0.0], [0.1], [50.0], [0.2]])  # 50 is far likelier under state 1, which state 0 cannot reach
    start = {
        "startprob": np.array([1.0, 0.0]),
        "transmat": np.array([[1.0, 0.0], [0.5, 0.5]]),
        "means": np.array([[0.0], [50.0]]),
        "covariances": np.array([1.0, 1.0]),
    }
    model = streamem_from("spherical", start, max_iter=0).fit(X)
    expected = sum(-0.5 * np.log(2 * np.pi) - 0.5 * x**2 for x in X[:, 0])  # every record from state 0
    assert model.score(X) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(model.filter_proba(X)[:, 1], 0.0)
    np.testing.assert_allclose(model.predict_proba(X)[:, 1], 0.0)


# -- fitting without a given start -------------------------------------------------------
def test_fit_recovers_a_sampled_chain():
    """Fitted to 20,000 records of a known sticky HMM from k-means++, the chain and means come back, and the
    log-likelihood is the one hmmlearn reaches when started from the truth."""
    truth = sticky_reference(n_states=3, n_features=2, seed=8)
    truth.means_ = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    X, states = truth.sample(20_000, random_state=3)
    model = se.GaussianHMM(3, random_state=0).fit(X)
    order = [int(np.argmin(((model.means_ - m) ** 2).sum(axis=1))) for m in truth.means_]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(model.means_[order], truth.means_, atol=0.1)
    np.testing.assert_allclose(model.transmat_[np.ix_(order, order)], truth.transmat_, atol=0.02)
    assert (np.asarray(order)[states] == model.predict(X)).mean() > 0.97
    from_truth = hmmlearn_hmm.GaussianHMM(3, "full", init_params="", n_iter=200, tol=1e-6, covars_prior=0)
    from_truth.startprob_, from_truth.transmat_ = truth.startprob_, truth.transmat_
    from_truth.means_, from_truth.covars_ = truth.means_, truth.covars_
    assert model.score(X) == pytest.approx(from_truth.fit(X).score(X), abs=0.5)


def test_sample_follows_the_fitted_chain():
    """sample() draws a path whose transition frequencies and per-state means match the model."""
    model = streamem_from("full", start_for("full", seed=9), max_iter=0).fit(sampled())
    X, states = model.sample(30_000, random_state=0)
    assert X.shape == (30_000, 2) and states.shape == (30_000,)
    counts = np.zeros((3, 3))
    np.add.at(counts, (states[:-1], states[1:]), 1)
    np.testing.assert_allclose(counts / counts.sum(axis=1, keepdims=True), model.transmat_, atol=0.03)
    for k in range(3):
        np.testing.assert_allclose(X[states == k].mean(axis=0), model.means_[k], atol=0.1)


def test_a_state_never_visited_keeps_its_parameters():
    """A state whose start is far from every record gets no mass: its mean, covariance and row stay, no NaN."""
    X = sampled(seed=4)[:, :1]
    start = {
        "startprob": np.array([0.5, 0.5, 0.0]),
        "transmat": np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.2, 0.3, 0.5]]),
        "means": np.array([[-1.0], [1.0], [1e4]]),
        "covariances": np.array([1.0, 1.0, 1.0]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        model = streamem_from("spherical", start, max_iter=5).fit(X)
    assert np.all(np.isfinite(model.means_)) and np.all(np.isfinite(model.transmat_))
    assert model.means_[2, 0] == 1e4 and model.covariances_[2] == 1.0
    np.testing.assert_allclose(model.transmat_[2], start["transmat"][2])


# -- statistics ------------------------------------------------------------------------------
def test_summarize_then_apply_is_one_more_iteration():
    """apply(summarize(X).statistics) on a model fitted for k iterations equals hmmlearn's k + 1."""
    X = sampled(seed=5)
    start = start_for("diag")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        ours = streamem_from("diag", start, max_iter=3).fit(X, LENGTHS)
    summary = ours.summarize(X, LENGTHS)
    assert summary.responsibilities.shape == (len(X), 3) and summary.statistics.count == pytest.approx(len(X))
    assert summary.log_likelihood.sum() == pytest.approx(ours.score(X, LENGTHS), rel=1e-12)
    ours.apply(summary.statistics)
    reference = hmmlearn_from("diag", start, n_iter=4).fit(X, LENGTHS)
    np.testing.assert_allclose(ours.transmat_, reference.transmat_, atol=1e-9)
    np.testing.assert_allclose(ours.means_, reference.means_, atol=1e-9)


def test_statistics_of_sequences_add_up():
    """Statistics of two halves, added, equal the statistics of both sequences summarised together."""
    X = sampled(seed=6)
    model = se.GaussianHMM(3, random_state=0).fit(X, LENGTHS)
    both = model.summarize(X, LENGTHS).statistics
    cut = LENGTHS[0] + LENGTHS[1]
    halves = model.summarize(X[:cut], LENGTHS[:2]).statistics + model.summarize(X[cut:], LENGTHS[2:]).statistics
    np.testing.assert_allclose(halves.first, both.first, atol=1e-9)
    np.testing.assert_allclose(halves.transitions, both.transitions, atol=1e-8)
    np.testing.assert_allclose(halves.emissions.second, both.emissions.second, rtol=1e-9)


def test_hmm_statistics_survive_json():
    """HMMStats to_dict -> JSON -> from_dict gives the same arrays; broken documents raise StateError."""
    X = sampled(seed=7)
    stats = se.GaussianHMM(3, random_state=0).fit(X).summarize(X).statistics
    again = se.HMMStats.from_dict(json.dumps(stats.to_dict()))
    np.testing.assert_array_equal(again.transitions, stats.transitions)
    np.testing.assert_array_equal(again.emissions.second, stats.emissions.second)
    document = stats.to_dict()
    for field, value, message in [
        ("transitions", [[1.0, 2.0]], "shape"),
        ("first", [1.0, -1.0, 0.0], "negative"),
        ("first", [1.0, float("nan"), 0.0], "finite"),
        ("emissions", {**document["emissions"], "type": "Nope"}, "unknown type"),
    ]:
        with pytest.raises(StateError, match=message):
            se.HMMStats.from_dict({**document, field: value})
    with pytest.raises(StateError, match="'transitions' is missing"):
        se.HMMStats.from_dict({k: v for k, v in document.items() if k != "transitions"})


def test_apply_refuses_statistics_of_another_model():
    """Statistics of a mixture, or of an HMM with other states, are a ValueError and change nothing."""
    X = sampled(seed=8)
    model = se.GaussianHMM(3, random_state=0).fit(X)
    before = model.transmat_.copy()
    mixture_stats = se.GaussianMixture(3, random_state=0).fit(X).summarize(X).statistics
    two_states = se.GaussianHMM(2, random_state=0).fit(X).summarize(X).statistics
    for statistics in (mixture_stats, two_states, *negated(model.summarize(X).statistics)):
        with pytest.raises(ValueError):
            model.apply(statistics)
    np.testing.assert_array_equal(model.transmat_, before)


def negated(statistics: se.HMMStats) -> list[se.HMMStats]:
    """Statistics no records can have: negative start or transition counts, a negative mass, and
    sums of squares that are not positive semi-definite (each would leave a model that cannot be saved)."""
    emissions = statistics.emissions
    mass = emissions.mass.copy()
    mass[0] = -mass[0]
    return [
        se.HMMStats(-1.0 - statistics.first, statistics.transitions, emissions),  # an online block's first is 0
        se.HMMStats(statistics.first, -statistics.transitions, emissions),
        se.HMMStats(statistics.first, statistics.transitions, dataclasses.replace(emissions, mass=mass)),
        se.HMMStats(statistics.first, statistics.transitions, dataclasses.replace(emissions, second=-emissions.second)),
    ]


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lengths", "message"),
    [([100, 100], "sum to 200"), ([0, 2500], "positive"), ([-5, 2505], "positive"), ([1250.0, 1250.0], "integers")],
)
def test_lengths_that_do_not_cut_X_are_refused(lengths, message):
    """lengths must be positive integers summing to len(X); a fitted model stays as it was."""
    X = sampled(n_records=2500)
    model = se.GaussianHMM(2, random_state=0).fit(X)
    before = (model.transmat_.copy(), model.means_.copy())
    for call in (model.fit, model.score, model.predict, model.predict_proba, model.filter_proba):
        with pytest.raises(ValueError, match=message):
            call(X, lengths)
    np.testing.assert_array_equal(model.transmat_, before[0])
    np.testing.assert_array_equal(model.means_, before[1])


@pytest.mark.parametrize(
    ("X", "message"),
    [
        ([[0.0], [np.nan], [1.0]], "NaN value at row 1"),
        ([[0.0], ["fast"], [1.0]], "non-numeric"),
        ([[0.0], [np.inf], [1.0]], "infinite"),
        ([0.0, 1.0, 2.0], "2-D"),
        ([[0.0], [1e155], [1.0]], "X row 1 is 1e\\+155, too large"),
    ],
)
def test_bad_records_are_a_clear_error_and_change_nothing(X, message):
    """NaN, strings, infinities and 1-D input raise ValueError naming the problem; the model is untouched."""
    model = se.GaussianHMM(2, random_state=0).fit(sampled(n_records=500)[:, :1])
    before = model.means_.copy()
    for call in (model.fit, model.score, model.predict):
        with pytest.raises(ValueError, match=message):
            call(X)
    np.testing.assert_array_equal(model.means_, before)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"transmat_init": [[0.5, 0.6], [0.5, 0.5]]}, "row of transmat must sum to 1"),
        ({"transmat_init": [[1.0]]}, r"\(2, 2\) matrix"),
        ({"startprob_init": [0.5, 0.4]}, "startprob must sum to 1"),
        ({"means_init": [[0.0, 0.0], [1.0, 1.0]]}, "features"),
        ({"covariance_type": "banana"}, "covariance_type"),
        ({"max_iter": -1}, "max_iter"),
        ({"n_states": 0}, "n_components"),
    ],
)
def test_bad_arguments_are_named(arguments, message):
    """Every bad argument raises ValueError naming it."""
    with pytest.raises(ValueError, match=message):
        se.GaussianHMM(**{"n_states": 2, **arguments}).fit(sampled(n_records=200)[:, :1])


def test_unfitted_model_says_so():
    """Inference before fit raises NotFittedError."""
    with pytest.raises(se.NotFittedError):
        se.GaussianHMM(2).predict([[0.0]])


def test_a_left_right_chain_with_a_state_unreachable_for_long_fits_as_hmmlearn():
    """A left-right chain (start in state 0, never back) on 200 records near 0 then 200 near 60: the state
    the filter rules out for 200 records gets no NaN; the fit equals hmmlearn's."""
    rng = np.random.default_rng(11)
    X = np.r_[rng.normal(0.0, 1.0, 200), rng.normal(60.0, 1.0, 200)][:, None]
    start = {
        "startprob": np.array([1.0, 0.0]),
        "transmat": np.array([[0.99, 0.01], [0.0, 1.0]]),
        "means": np.array([[1.0], [50.0]]),
        "covariances": np.array([1.0, 1.0]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        ours = streamem_from("spherical", start, max_iter=10).fit(X)
    reference = hmmlearn_from("spherical", start, n_iter=10).fit(X)
    np.testing.assert_allclose(ours.means_, reference.means_, atol=1e-6)
    assert ours.score(X) == pytest.approx(reference.score(X), rel=1e-9)
    assert np.all(np.isfinite(ours.predict_proba(X)))
