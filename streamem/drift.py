"""Detecting drift in mixture weights from a model's per-record responsibilities."""

from __future__ import annotations

import dataclasses
import functools

import numba
import numpy as np
from river import base
from scipy.stats import chi2

__all__ = ["DriftEvent", "WeightDriftDetector"]

_WEIGHT_FLOOR = 1e-3  # a reference weight below this is treated as this (a near-empty component)


@dataclasses.dataclass(frozen=True)
class DriftEvent:
    """A declared drift: the row it happened at and the detector's view there."""

    index: int
    weights: list[float]
    reference_weights: list[float]
    distance: float


class WeightDriftDetector(base.DriftDetector):
    """Detects a change of the mixture weights in a stream of responsibilities.

    Each record's responsibilities (the model's p(z=k | x), summing to 1) feed
    exponentially weighted averages over several short horizons (half-lives in
    records), the current weights. They are compared with a reference: the mean
    responsibilities since the last anchor (a cumulative mean up to
    `reference_size` records, an exponentially weighted one after). The statistic
    for horizon h is Pearson's chi-square,

        T_h = sum_k (w_hk - ref_k)^2 / ref_k / (v_h + v_ref),

    where v_h and v_ref are the variance factors of the two averages (lambda / (2 -
    lambda) for an exponentially weighted mean, 1 / n for a cumulative one) and a
    reference weight is floored at 5 / n_eff of the horizon (Pearson's rule of five
    expected records per cell), so that T_h is approximately chi-square with K - 1 degrees of
    freedom on a stationary stream of hard assignments (soft responsibilities vary
    less, which makes the test conservative). Drift is declared when any T_h exceeds
    the chi-square quantile at `false_alarm / n_horizons`. Several horizons make a
    large shift show up in about one short half-life and a small one in a long one.

    After a drift every average re-anchors: each restarts from the records that
    follow (a cumulative mean until it reaches its own window), and no drift is
    declared during a grace period of `grace` records, so one regime change is
    reported once, not on every record.

    Defaults and why: half-lives of 100, 400 and 1600 records catch a 0.3 weight
    shift within about 80 records and a 0.1 shift within about 900 (medians on
    one-hot streams); `reference_size=5000` keeps the reference's own noise small
    next to the short averages'; `false_alarm=1e-5` is a per-record chi-square
    tail. The averages are strongly autocorrelated, so the false alarms actually
    measured are far rarer: 0.6 per million records over 10 million stationary
    one-hot records in five weight profiles (shorter half-lives of 50 records made
    the chi-square tail too light, 1.4 per million; `false_alarm=1e-6` gave 0.1 per
    million with 15% longer delays). The chi-square watches every weight at once, so
    it sees mass moving between two minor components directly; a detector on the
    dominant component's indicator sees it only through the model's shifting
    boundaries.

    No River detector serves inside: ADWIN, Page-Hinkley and KSWIN watch one
    univariate signal, and a weight vector needs a joint test; ADWIN on the
    dominant component's indicator is the baseline the harness compares against.

    Parameters
    ----------
    n_components
        Number of mixture components K.
    half_lives
        Half-lives (records) of the short-horizon averages.
    reference_size
        Records in the reference's cumulative mean, and its window afterwards.
    grace
        Records after the start and after each drift before a drift can be declared.
    false_alarm
        Tail probability per record for the chi-square threshold (split over the horizons).

    Attributes
    ----------
    weights_ : (K,) the shortest horizon's current weights
    reference_weights_ : (K,) the reference
    distance : total variation between the two, 0.5 * sum |w - ref|
    statistic : the largest T_h over its threshold (drift when > 1)
    n_detections : drifts declared so far

    Examples
    --------
    >>> import numpy as np
    >>> from streamem.drift import WeightDriftDetector
    >>> rng = np.random.default_rng(0)
    >>> detector = WeightDriftDetector(n_components=2)
    >>> first_weights = [0.5] * 3000 + [0.8] * 3000   # the weight of component 0 jumps at 3000
    >>> detected = []
    >>> for t, weight in enumerate(first_weights):
    ...     hard = 1.0 if rng.random() < weight else 0.0
    ...     detector.update([hard, 1.0 - hard])
    ...     if detector.drift_detected:
    ...         detected.append(t)
    >>> len(detected), 3000 < detected[0] < 3300
    (1, True)
    """

    def __init__(
        self,
        n_components: int = 2,
        half_lives: tuple = (100, 400, 1600),
        reference_size: int = 5000,
        grace: int = 300,
        false_alarm: float = 1e-5,
    ):
        super().__init__()
        if not isinstance(n_components, int) or n_components < 2:
            raise ValueError(f"n_components must be an integer >= 2, got {n_components!r}")
        if not half_lives or any(not h > 0 for h in half_lives):
            raise ValueError(f"half_lives must be positive numbers, got {half_lives!r}")
        if not 0 < false_alarm < 1:
            raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm!r}")
        self.n_components = n_components
        self.half_lives = tuple(half_lives)
        self.reference_size = reference_size
        self.grace = grace
        self.false_alarm = false_alarm
        self._steps = np.array([1.0 - 0.5 ** (1.0 / h) for h in self.half_lives])
        self._windows = np.array([_window(step) for step in self._steps], dtype=np.int64)
        self._threshold = _chi2_threshold(false_alarm / len(self.half_lives), n_components - 1)
        self._reset()

    @classmethod
    def _unit_test_params(cls):
        yield {"n_components": 3}

    def _reset(self) -> None:
        super()._reset()
        K = self.n_components
        self._short = np.full((len(self.half_lives), K), 1.0 / K)
        self._reference = np.full(K, 1.0 / K)
        self._since_anchor = 0
        self._seen = 0
        self.statistic = 0.0
        self.n_detections = 0

    @property
    def weights_(self) -> np.ndarray:
        return self._short[0].copy()

    @property
    def reference_weights_(self) -> np.ndarray:
        return self._reference.copy()

    @property
    def distance(self) -> float:
        return float(0.5 * np.abs(self._short[0] - self._reference).sum())

    def update(self, x) -> None:
        """Feed one record's responsibilities (a sequence of K numbers, or a {k: p} dict)."""
        if isinstance(x, dict):
            x = [x.get(k, 0.0) for k in range(self.n_components)]
        detections = self.update_many(np.asarray(x, dtype=float)[None, :])
        self._drift_detected = bool(detections)

    def update_many(self, responsibilities: np.ndarray) -> list[DriftEvent]:
        """Feed a batch (n, K) of responsibilities; return the drifts declared, one event each.

        Gives the same states and detections as calling `update` row by row.
        """
        R = np.asarray(responsibilities, dtype=float)
        if R.ndim != 2 or R.shape[1] != self.n_components:
            raise ValueError(f"responsibilities must have shape (n, {self.n_components}), got {R.shape}")
        if not np.all(np.isfinite(R)):
            raise ValueError("responsibilities contain NaN or infinite values")
        events: list[DriftEvent] = []
        start = 0
        while start < len(R):
            found = self._scan(R[start:])
            if found is None:
                break
            events.append(
                DriftEvent(start + found, self.weights_.tolist(), self.reference_weights_.tolist(), self.distance)
            )
            start += found + 1
        self._drift_detected = bool(events) and events[-1].index == len(R) - 1
        return events

    def _scan(self, R: np.ndarray) -> int | None:
        """Run the averages over R; stop at the first drift (re-anchoring there) or at the end."""
        reference_step = 1.0 / self.reference_size
        stop, score = _scan_rows(
            np.ascontiguousarray(R),
            self._short,
            self._reference,
            self._since_anchor,
            self._steps,
            self._windows,
            reference_step,
            _window(reference_step),
            self._threshold,
            self.grace,
        )  # moves self._short and self._reference to row `stop`, in place
        self._since_anchor += stop + 1
        self._seen += stop + 1
        self.statistic = score
        if not score > 1.0:
            return None
        self.n_detections += 1
        # Re-anchor: every average restarts from the records after the drift.
        self._since_anchor = 0
        return stop

    # -- state ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "params": {
                "n_components": self.n_components,
                "half_lives": list(self.half_lives),
                "reference_size": self.reference_size,
                "grace": self.grace,
                "false_alarm": self.false_alarm,
            },
            "short": self._short.tolist(),
            "reference": self._reference.tolist(),
            "since_anchor": self._since_anchor,
            "seen": self._seen,
            "n_detections": self.n_detections,
        }

    @classmethod
    def from_dict(cls, state: dict) -> WeightDriftDetector:
        params = dict(state["params"])
        params["half_lives"] = tuple(params["half_lives"])
        detector = cls(**params)
        short = np.array(state["short"], dtype=float)  # copies: the detector moves its own in place
        reference = np.array(state["reference"], dtype=float)
        if short.shape != detector._short.shape or reference.shape != detector._reference.shape:
            raise ValueError("drift detector state has the wrong shape")
        if not (np.all(np.isfinite(short)) and np.all(np.isfinite(reference))):
            raise ValueError("drift detector state has non-finite values")
        detector._short, detector._reference = short, reference
        detector._since_anchor = int(state["since_anchor"])
        detector._seen = int(state["seen"])
        detector.n_detections = int(state["n_detections"])
        return detector

    def __len__(self) -> int:  # records seen
        return self._seen


def _window(step: float) -> int:
    """Records a running mean of weight `step` is a cumulative mean for (1 / step), before it turns
    exponentially weighted."""
    return max(1, int(round(1.0 / step)))


@numba.njit(cache=True, nogil=True)
def _scan_rows(R, short, reference, since_anchor, steps, windows, reference_step, reference_window, threshold, grace):
    """The detector's recursion over the rows of R, until the first row whose statistic passes 1 or the
    last row: returns (that row, its statistic), with `short` (H, K) and `reference` (K,) moved to it.

    Each average restarts at an anchor: for its first `window` records since the anchor (`since_anchor`
    of them averaged already) it is their cumulative mean, after that an exponentially weighted mean of
    weight `step`. Its variance factor (relative to one record's) is 1 / count, then step / (2 - step).
    Compiled: a row's update depends on the previous row's, which NumPy can only run as one filter
    call per average and then score (20x slower at 1024 rows, K=2, three horizons).
    """
    n, K = R.shape
    H = steps.shape[0]
    short_totals = np.empty((H, K))
    reference_totals = np.empty(K)
    for k in range(K):  # sums of the cumulative means so far
        reference_totals[k] = reference[k] * since_anchor
        for h in range(H):
            short_totals[h, k] = short[h, k] * since_anchor
    score = 0.0
    for i in range(n):
        count = since_anchor + i + 1
        for k in range(K):
            if count <= reference_window:
                reference_totals[k] += R[i, k]
                reference[k] = reference_totals[k] / count
            else:
                reference[k] = reference_step * R[i, k] + (1.0 - reference_step) * reference[k]
        reference_variance = 1.0 / count if count <= reference_window else reference_step / (2.0 - reference_step)
        score = 0.0
        for h in range(H):
            step = steps[h]
            cumulative = count <= windows[h]
            for k in range(K):
                if cumulative:
                    short_totals[h, k] += R[i, k]
                    short[h, k] = short_totals[h, k] / count
                else:
                    short[h, k] = step * R[i, k] + (1.0 - step) * short[h, k]
            variance = 1.0 / count if cumulative else step / (2.0 - step)
            # Pearson's chi-square needs ~5 expected records per cell to hold: a rare component's
            # weight is floored at 5 records' worth of the horizon's effective sample size.
            cell_floor = max(_WEIGHT_FLOOR, 5.0 * variance)
            gap = 0.0
            for k in range(K):
                difference = short[h, k] - reference[k]
                gap += difference * difference / max(reference[k], cell_floor)
            score = max(score, gap / (variance + reference_variance) / threshold)
        if count <= grace:
            score = 0.0
        if score > 1.0:
            return i, score
    return n - 1, score


@functools.lru_cache(maxsize=64)
def _chi2_threshold(tail: float, degrees: int) -> float:
    """chi2's upper `tail` quantile: once per setting, not once per detector (scipy takes ~0.1 ms, and
    the Kafka consumer makes a detector for each of thousands of keys)."""
    return float(chi2.isf(tail, degrees))
