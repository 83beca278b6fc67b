"""WeightDriftDetector on small fixed streams: detects shifts, stays quiet, reports once, state."""

from __future__ import annotations

import numpy as np
import pytest
from river import base

from streamem.drift import WeightDriftDetector


def hard_stream(weights: np.ndarray, rng) -> np.ndarray:
    """One-hot responsibilities (n, K) drawn from per-record weights (n, K)."""
    labels = (rng.random(len(weights))[:, None] > weights.cumsum(axis=1)).sum(axis=1)
    return np.eye(weights.shape[1])[labels]


def regimes(*parts: tuple[list[float], int]) -> np.ndarray:
    return np.vstack([np.tile(w, (n, 1)) for w, n in parts])


def test_detects_a_shift_of_0_3_within_300_records():
    """Weights 0.5/0.3/0.2 -> 0.2/0.6/0.2 at record 5000 are detected within 300 records (median ~60)."""
    for seed in range(10):
        R = hard_stream(regimes(([0.5, 0.3, 0.2], 5000), ([0.2, 0.6, 0.2], 3000)), np.random.default_rng(seed))
        events = WeightDriftDetector(3).update_many(R)
        assert len(events) == 1, [e.index for e in events]
        assert 5000 <= events[0].index < 5300


def test_stays_quiet_on_a_stationary_stream():
    """300,000 stationary records of fixed seed raise no drift."""
    R = hard_stream(regimes(([0.6, 0.25, 0.15], 300_000)), np.random.default_rng(42))
    assert WeightDriftDetector(3).update_many(R) == []


def test_each_regime_change_is_reported_once():
    """Three regimes: exactly two drifts, one after each change, then the reference re-anchors."""
    R = hard_stream(regimes(([0.7, 0.3], 6000), ([0.3, 0.7], 6000), ([0.7, 0.3], 6000)), np.random.default_rng(3))
    events = WeightDriftDetector(2).update_many(R)
    assert [6000 <= e.index < 6500 or 12000 <= e.index < 12500 for e in events] == [True, True]
    first = events[0]
    assert first.reference_weights[0] == pytest.approx(0.7, abs=0.05)
    assert first.distance > 0.1


def test_update_one_by_one_equals_update_many():
    """update() per record and update_many() on the batch give the same detections and state."""
    R = hard_stream(regimes(([0.5, 0.5], 3000), ([0.85, 0.15], 2000)), np.random.default_rng(5))
    one, many = WeightDriftDetector(2), WeightDriftDetector(2)
    found = []
    for t, row in enumerate(R):
        one.update(row)
        if one.drift_detected:
            found.append(t)
    assert found == [e.index for e in many.update_many(R)]
    np.testing.assert_allclose(one.weights_, many.weights_)
    np.testing.assert_allclose(one.reference_weights_, many.reference_weights_)


def test_soft_responsibilities_and_dicts_are_accepted():
    """River-style {k: p} dicts work as input and the detector is a River DriftDetector."""
    detector = WeightDriftDetector(2)
    assert isinstance(detector, base.DriftDetector)
    detector.update({0: 0.3, 1: 0.7})
    assert not detector.drift_detected
    np.testing.assert_allclose(detector.weights_, [0.3, 0.7])


def test_state_round_trip_continues_identically():
    """to_dict/from_dict mid-stream, then the same detections as never stopping."""
    R = hard_stream(regimes(([0.5, 0.5], 3000), ([0.9, 0.1], 2000)), np.random.default_rng(8))
    whole = [e.index for e in WeightDriftDetector(2).update_many(R)]
    first = WeightDriftDetector(2)
    first.update_many(R[:2500])
    resumed = WeightDriftDetector.from_dict(first.to_dict())
    assert [2500 + e.index for e in resumed.update_many(R[2500:])] == whole


@pytest.mark.parametrize(
    ("rows", "message"),
    [(np.ones((3, 3)), r"shape \(n, 2\)"), (np.array([[np.nan, 1.0]]), "NaN or infinite")],
)
def test_bad_input_is_refused(rows, message):
    """Responsibilities of the wrong width or with NaN raise ValueError."""
    with pytest.raises(ValueError, match=message):
        WeightDriftDetector(2).update_many(rows)
