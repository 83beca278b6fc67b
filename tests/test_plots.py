"""Each figure renders on small data (no display) to a valid PNG of sensible size."""

from __future__ import annotations

import numpy as np
import pytest

import streamem as se
from streamem import plots
from tests.conftest import seed_example_two

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=8_000, max_bytes=600_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 400 <= width <= 1400 and 300 <= height <= 1000, (width, height)
    assert min_bytes <= len(data) <= max_bytes, len(data)


@pytest.fixture
def one_d():
    x = np.r_[np.random.default_rng(0).normal(1.5, 0.5, 300), np.random.default_rng(1).normal(8.5, 0.5, 300)]
    return x, se.GaussianMixture(2, random_state=0).fit(x[:, None])


def test_one_dimensional_figures(one_d, tmp_path):
    """Histogram with components and assignments, EM trace, responsibilities."""
    x, model = one_d
    _check_png(plots.save(plots.mixture_1d(model, x), tmp_path / "mixture.png"))
    _check_png(plots.save(plots.log_likelihood_trace(model), tmp_path / "trace.png"))
    _check_png(plots.save(plots.responsibilities(model, x), tmp_path / "resp.png"))


def test_two_dimensional_figure_on_old_faithful(faithful, tmp_path):
    """Points by component, means and 1/2/3 sd ellipses."""
    model = se.GaussianMixture(2, random_state=0).fit(faithful)
    _check_png(plots.save(plots.mixture_2d(model, faithful, names=("eruptions", "waiting")), tmp_path / "2d.png"))


def test_regression_selection_and_online_figures(tmp_path):
    """Regression lines with noise bands; BIC/AIC against K; online weights and means over time."""
    X, y = seed_example_two(800, np.random.default_rng(2))
    model = se.RegressionMixture(2, random_state=0).fit(X, y)
    _check_png(plots.save(plots.regression_lines(model, X, y), tmp_path / "lines.png"))
    _check_png(
        plots.save(
            plots.selection([1, 2, 3, 4], [400.0, 300.0, 310.0, 320.0], [390.0, 290, 295, 300]), tmp_path / "bic.png"
        ),
        min_bytes=5_000,
    )
    history = [
        (n, [0.5 + 0.1 * np.sin(n / 500), 0.5 - 0.1 * np.sin(n / 500)], [[0.0], [5.0]]) for n in range(0, 5000, 100)
    ]
    _check_png(plots.save(plots.online_trace(history), tmp_path / "online.png"))
