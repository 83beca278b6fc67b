"""OnlineRegressionMixture against the seed example, the batch core and River's evaluation loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
from river import evaluate, metrics, stream

import streamem as se
from tests.conftest import seed_example_two


def test_seed_example_two_stream_is_recovered_by_learn_one():
    """Slopes .5/1.5, intercepts 1/2, noise .1/.2 and weights .5/.5 from a learn_one stream."""
    X, y = seed_example_two(20_000, np.random.default_rng(0))
    model = se.OnlineRegressionMixture(2, batch_size=64, warmup=500, seed=0)
    for xi, yi in zip(X[:, 0], y):
        model.learn_one({"x": xi}, yi)
    order = np.argsort(model.coef_[:, 0])
    np.testing.assert_allclose(model.coef_[order, 0], [0.5, 1.5], atol=0.01)
    np.testing.assert_allclose(model.intercept_[order], [1.0, 2.0], atol=0.05)
    np.testing.assert_allclose(np.sqrt(model.noise_variance_[order]), [0.1, 0.2], atol=0.01)
    np.testing.assert_allclose(model.weights_[order], [0.5, 0.5], atol=0.02)


def test_online_matches_batch_on_the_same_stream():
    """On 50k records the online lines match batch EM's: coefficients within 0.02, log-likelihood within 0.01."""
    X, y = seed_example_two(50_000, np.random.default_rng(1))
    online = se.OnlineRegressionMixture(2, batch_size=128, warmup=1000, seed=0)
    online.learn_many(pd.DataFrame(X, columns=["x"]), pd.Series(y))
    batch = se.RegressionMixture(2, random_state=0).fit(X, y)
    report = se.compare(online, batch, X, y)
    assert report.mean_gap < 0.02 and report.weight_gap < 0.01, report
    assert abs(report.log_likelihood_gap) < 0.01, report


def test_progressive_validation_beats_a_single_line():
    """In river.evaluate.progressive_val_score the mixture's MAE on seed example 2 beats one line's."""
    X, y = seed_example_two(5_000, np.random.default_rng(2))
    data = list(stream.iter_array(X, y, feature_names=["x"]))
    mixture = evaluate.progressive_val_score(
        data, se.OnlineRegressionMixture(2, batch_size=32, warmup=300, seed=0), metrics.MAE()
    )
    single = evaluate.progressive_val_score(
        data, se.OnlineRegressionMixture(1, batch_size=32, warmup=300, seed=0), metrics.MAE()
    )
    assert np.isfinite(mixture.get())
    # The mixture predicts E[y|x], the same conditional mean, so its MAE is no worse than one line's.
    assert mixture.get() <= single.get() * 1.05


def test_features_that_appear_later_extend_the_model():
    """A feature first seen after the warm-up gets a coefficient that converges to its true value."""
    rng = np.random.default_rng(3)
    model = se.OnlineRegressionMixture(1, batch_size=50, warmup=200, seed=0)
    for _ in range(1000):
        x = rng.normal()
        model.learn_one({"x": x}, 2.0 * x + rng.normal(0, 0.1))
    for _ in range(5000):
        x, z = rng.normal(), rng.normal()
        model.learn_one({"x": x, "z": z}, 2.0 * x - 3.0 * z + rng.normal(0, 0.1))
    assert model.feature_names_ == ["x", "z"]
    np.testing.assert_allclose(model.coef_[0], [2.0, -3.0], atol=0.05)
