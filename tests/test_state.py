"""Stored model states and checkpoints that pass the schema but would poison the consumer are refused at load."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from streamem import OnlineGMM, OnlineRegressionMixture
from streamem.state import StateError
from streamem_connectors.kafka.checkpoint import Checkpoint, CheckpointError, restore_model


def _warm_gmm(covariance_type: str = "full") -> dict:
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (300, 2)), rng.normal(6, 1, (300, 2))])
    model = OnlineGMM(n_components=2, covariance_type=covariance_type, warmup=200, batch_size=50, seed=0)
    model.learn_many(pd.DataFrame(X, columns=["a", "b"]))
    return json.loads(json.dumps(model.to_dict()))


def _checkpoint(model: dict | None, offsets: list[dict]) -> str:
    return json.dumps(  # json, not orjson: orjson cannot even write the out-of-range values tested
        {"version": 1, "key": "g/0", "model": model, "detector": None, "offsets": offsets,
         "counters": {"records_in": 536, "assigned": 536, "dead_lettered": 0, "drift_events": 0}}
    )  # fmt: skip


@pytest.mark.parametrize("field", ["n_seen", "n_outliers"])
def test_a_count_beyond_64_bits_is_refused_naming_it(field):
    """model.n_seen = 10**30 used to load, then crash every checkpoint in orjson ('Integer exceeds 64-bit range')."""
    state = _warm_gmm()
    state[field] = 10**30
    with pytest.raises(StateError, match=field):
        OnlineGMM.from_dict(state)
    with pytest.raises(CheckpointError, match=f"model.{field}"):
        restore_model(OnlineGMM, state, "file x")


def test_an_engine_update_count_beyond_64_bits_is_refused():
    """engine.n_updates and engine.n_averaged are counts too: refused past 2**63, naming the field."""
    state = _warm_gmm()
    state["engine"]["n_averaged"] = 2**63
    with pytest.raises(StateError, match="n_averaged"):
        OnlineGMM.from_dict(state)
    state = _warm_gmm()
    state["engine"]["n_updates"] = 1e30
    with pytest.raises(StateError, match="n_updates"):
        OnlineGMM.from_dict(state)


def test_a_checkpoint_offset_or_counter_beyond_64_bits_is_refused_naming_it():
    """Offsets and counters are written back by orjson: a value it cannot write is refused at load."""
    with pytest.raises(CheckpointError, match=r"offsets\.0\.offset"):
        Checkpoint.parse(_checkpoint(None, [{"topic": "t1", "partition": 0, "offset": 2**63}]), "file x")
    raw = json.loads(_checkpoint(None, []))
    raw["counters"]["records_in"] = 10**30
    with pytest.raises(CheckpointError, match=r"counters\.records_in"):
        Checkpoint.parse(json.dumps(raw), "file x")


def test_a_negative_offset_is_refused_naming_the_field():
    """A negative offset names 'offsets.0.offset' (not a bare 'Input should be an object')."""
    with pytest.raises(CheckpointError, match=r"field 'offsets\.0\.offset'"):
        Checkpoint.parse(_checkpoint(None, [{"topic": "t1", "partition": 0, "offset": -1}]), "file x")


def test_a_partition_listed_twice_is_refused_naming_it():
    """Two offsets for one partition: the last used to win (536 -> 0) and records were learned again."""
    offsets = [{"topic": "t1", "partition": 0, "offset": 536}, {"topic": "t1", "partition": 1, "offset": 9},
               {"topic": "t1", "partition": 0, "offset": 0}]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"field 'offsets': partition t1\[0\] is listed twice"):
        Checkpoint.parse(_checkpoint(None, offsets), "file x")


def test_second_moments_that_are_not_positive_semi_definite_are_refused():
    """second = [[-5, 100, -5], ...] used to load (eigenvalues clipped) and then dead-letter every record."""
    state = _warm_gmm()
    state["engine"]["stats"]["second"] = [[-5.0, 100.0, -5.0], [-5.0, 100.0, -5.0]]
    with pytest.raises(StateError, match="stats.second"):
        OnlineGMM.from_dict(state)
    with pytest.raises(CheckpointError, match="stats.second"):
        restore_model(OnlineGMM, state, "file x")


def test_negative_diagonal_second_moments_and_masses_are_refused():
    """Diagonal second moments and component masses are sums of squares / weights: never negative."""
    state = _warm_gmm("diag")
    state["engine"]["stats"]["second"][1][0] = -3.0
    with pytest.raises(StateError, match="stats.second"):
        OnlineGMM.from_dict(state)
    state = _warm_gmm()
    state["engine"]["stats"]["mass"][0] = -0.5
    with pytest.raises(StateError, match="stats.mass"):
        OnlineGMM.from_dict(state)


def test_regression_cross_products_that_are_not_positive_semi_definite_are_refused():
    """A regression mixture's xx (per component) must be positive semi-definite and yy non-negative."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 2))
    y = X @ [1.0, -2.0] + rng.normal(0, 0.1, 400)
    model = OnlineRegressionMixture(n_components=2, warmup=200, batch_size=50, seed=0)
    model.learn_many(pd.DataFrame(X, columns=["a", "b"]), pd.Series(y))
    state = json.loads(json.dumps(model.to_dict()))
    state["engine"]["stats"]["xx"][0][0][0] = -1.0
    with pytest.raises(StateError, match="stats.xx"):
        OnlineRegressionMixture.from_dict(state)
    genuine = json.loads(json.dumps(model.to_dict()))
    assert OnlineRegressionMixture.from_dict(genuine).to_dict() == genuine


def test_genuine_states_still_load():
    """The checks refuse nothing a model writes: every covariance type round-trips."""
    for kind in ("full", "tied", "diag", "spherical"):
        state = _warm_gmm(kind)
        assert OnlineGMM.from_dict(state).to_dict() == state
