"""WeightDriftDetector on small fixed streams: detects shifts, stays quiet, reports once, state."""

from __future__ import annotations

import json

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
    """Three regimes: exactly one drift within 300 records of each change, none elsewhere; the reference re-anchors."""
    changes = [6000, 12000]
    for seed in range(5):
        R = hard_stream(
            regimes(([0.7, 0.3], 6000), ([0.3, 0.7], 6000), ([0.7, 0.3], 6000)), np.random.default_rng(seed)
        )
        events = WeightDriftDetector(2).update_many(R)
        indices = [e.index for e in events]
        # one event per change, each within 300 records after it: a repeat or a false alarm breaks the pairing
        assert len(events) == len(changes), indices
        for event, change in zip(events, changes):
            assert change <= event.index < change + 300, indices
        # the reference before each drift is the regime that ended (re-anchored after the first drift)
        assert events[0].reference_weights[0] == pytest.approx(0.7, abs=0.05)
        assert events[1].reference_weights[0] == pytest.approx(0.3, abs=0.05)
        assert events[0].distance > 0.1 and events[1].distance > 0.1


def test_update_one_by_one_equals_update_many():
    """update() per record and update_many() on the batch give the same detections (one, after the change) and state."""
    R = hard_stream(regimes(([0.5, 0.5], 3000), ([0.85, 0.15], 2000)), np.random.default_rng(5))
    one, many = WeightDriftDetector(2), WeightDriftDetector(2)
    found = []
    for t, row in enumerate(R):
        one.update(row)
        if one.drift_detected:
            found.append(t)
    assert len(found) == 1 and 3000 <= found[0] < 3300, found
    assert found == [e.index for e in many.update_many(R)]
    assert one.n_detections == many.n_detections == 1
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
    """to_dict/from_dict before, just after and within the grace of a drift: the same drifts as never stopping."""
    R = hard_stream(regimes(([0.5, 0.5], 3000), ([0.9, 0.1], 3000), ([0.5, 0.5], 3000)), np.random.default_rng(8))
    uninterrupted = WeightDriftDetector(2)
    whole = [e.index for e in uninterrupted.update_many(R)]
    assert len(whole) == 2 and 3000 <= whole[0] < 3300 and 6000 <= whole[1] < 6300, whole
    for cut in (2500, whole[0] + 1, whole[0] + 150, 4500):
        first = WeightDriftDetector(2)
        before = [e.index for e in first.update_many(R[:cut])]
        resumed = WeightDriftDetector.from_dict(json.loads(json.dumps(first.to_dict())))
        after = [cut + e.index for e in resumed.update_many(R[cut:])]
        assert before + after == whole, (cut, before, after)
        assert len(resumed) == len(uninterrupted) == len(R)
        np.testing.assert_allclose(resumed.weights_, uninterrupted.weights_)
        np.testing.assert_allclose(resumed.reference_weights_, uninterrupted.reference_weights_)


def test_a_restored_detector_owns_its_state():
    """from_dict copies the arrays it is given: the detector moves its averages in place, and must neither
    change the caller's state nor fail on a read-only one."""
    detector = WeightDriftDetector(2)
    detector.update_many(np.tile([0.7, 0.3], (500, 1)))
    state = detector.to_dict()
    state["short"], state["reference"] = np.array(state["short"]), np.array(state["reference"])
    kept = state["short"].copy(), state["reference"].copy()
    state["reference"].flags.writeable = False
    WeightDriftDetector.from_dict(state).update_many(np.tile([0.2, 0.8], (500, 1)))
    np.testing.assert_array_equal(state["short"], kept[0])
    np.testing.assert_array_equal(state["reference"], kept[1])


@pytest.mark.parametrize(
    ("rows", "message"),
    [(np.ones((3, 3)), r"shape \(n, 2\)"), (np.array([[np.nan, 1.0]]), "NaN or infinite")],
)
def test_bad_input_is_refused(rows, message):
    """Responsibilities of the wrong width or with NaN raise ValueError."""
    with pytest.raises(ValueError, match=message):
        WeightDriftDetector(2).update_many(rows)
