"""Shared fixtures: real datasets shipped in tests/data and seeded generators."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import settings

DATA = pathlib.Path(__file__).parent / "data"

settings.register_profile("streamem", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("streamem")


@pytest.fixture
def faithful() -> np.ndarray:
    """Old Faithful (272 x 2: eruption minutes, waiting minutes)."""
    return pd.read_csv(DATA / "faithful.csv")[["eruptions", "waiting"]].to_numpy(float)


@pytest.fixture
def stock_returns() -> np.ndarray:
    """Daily log returns of DAX, SMI, CAC, FTSE, 1991-98 (1859 x 4)."""
    prices = pd.read_csv(DATA / "eu_stock_markets.csv")[["DAX", "SMI", "CAC", "FTSE"]].to_numpy(float)
    return np.diff(np.log(prices), axis=0)


def seed_example_two(n: int, rng: np.random.Generator):
    """Seed example 2: y = 0.5x + 1 + N(0, .1^2) or y = 1.5x + 2 + N(0, .2^2), p = .5, x ~ U(0, 10)."""
    x = rng.uniform(0, 10, n)
    first = rng.random(n) < 0.5
    y = np.where(first, 0.5 * x + 1.0, 1.5 * x + 2.0) + rng.normal(0.0, np.where(first, 0.1, 0.2))
    return x[:, None], y


def well_separated(n: int, rng: np.random.Generator, n_components: int = 3, n_features: int = 2):
    """Samples of a mixture whose means are ~10 standard deviations apart."""
    means = rng.normal(0.0, 10.0, (n_components, n_features))
    labels = rng.integers(n_components, size=n)
    return means[labels] + rng.normal(size=(n, n_features)), labels, means


@pytest.fixture(scope="session")
def broker():
    """One embedded Tansu broker for the test session; tests use their own topic names."""
    from streamem_connectors.kafka.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running
