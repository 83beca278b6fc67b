"""The outlier guard of the online estimators: which records are too absurd to learn, and why.

Two rules, checked before a record reaches the statistics:

1. **Too large.** A value with `|x| >= 1e150` is always refused (whatever the options): its
   square (1e300) is within a factor 1e8 of float64's largest number, so the second moments of
   a mini-batch would overflow to inf and the next M-step would fail, on every restart.
2. **Too far.** Once the model is warm, a record whose squared distance to the closest component
   exceeds `threshold` (default 1e6, i.e. 1000 standard deviations): for a Gaussian mixture the
   squared Mahalanobis distance `min_k (x - m_k)' S_k^-1 (x - m_k)`; for a regression mixture the
   squared distance of the target and the features from their running means, in running
   variances (not the residual under the closest line: a line fitted on a short warm-up can be
   wild, and a residual rule would then refuse good records for good; an absurd `x` with a
   near-zero coefficient, which leaves residuals alone, would still wreck the normal equations).
   During the warm-up there is no model yet: the distance is taken from the median of the
   buffered records in units of their robust spread (1.4826 MAD per feature), once 20 records
   are buffered; the whole warm-up buffer is screened again when the warm-up fit starts.

Why 1e6. For Gaussian data the squared distance to the record's own component is chi2(d), and
the minimum over components is smaller still, so P(refused) <= P(chi2_d > 1e6): below 1e-200000
for every d <= 100 (the 1 - 1e-6 quantile is 23.9 for d = 1 and 182 for d = 100).
benchmarks/outliers.py measures it (BENCHMARKS.md): 1e7 chi2(d) draws for each of d = 1, 2, 10,
100 reach 28.6 to 190, none refused; an `OnlineGMM` over 1e6 records of a two-component mixture
in d = 10 (estimated parameters, warm-up included) refuses none; the daily returns of four
European indices 1991-98 (crash days of 10-20 sd in one market), learned one by one (K = 2, full),
reach 67: none of 1,859 refused, a margin of 15,000. A record 1000 sd away, learned, would inflate
its component's variance by about `eta / batch_size * 1e6` (156x with eta = 0.02, batch 128).

A stream that moves is not an outlier. A feature that was constant while the model learned has
variance `reg_covar` (1e-6) in every component, so a change of 1 in it is 1000 sd away; a sensor
with sd 0.001 whose level moves by 5 is 5000 sd away. Refused records are never learned, so on its
own the guard would refuse such a stream for good. With `outliers="skip"` (the Kafka consumer's
mode), when more than half of the last `batch_size` records screened are refused by the distance
rule, the model concludes that the stream has moved (outliers are rare: for Gaussian data fewer
than 1 in 1e200000), logs one WARNING with the counts, drops its statistics and warms up again,
starting from the refused records of that window (which stay reported as refused): at most
`batch_size` records are refused after a shift (`batch_size // 2 + 1` with `learn_one`; `learn_many`
sees a mini-batch at a time), and `warmup` records later the model is warm on the new level.
Isolated absurd records (1e6 in a N(6, 1) stream, even one in ten) never reach half a window;
values too large never count. A burst of absurd records (30 in a row) looks like a move and costs
the old statistics, but the new warm-up fit leaves it out (the records after it set the median).
With `outliers="raise"` the caller sees every refusal and the model never changes on its own.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from streamem.exceptions import OutlierError

__all__ = [
    "DEFAULT_THRESHOLD",
    "TOO_LARGE",
    "OutlierError",
    "OutlierScreen",
    "robust_reference",
    "screen_against",
    "screen_warm_up",
    "warm_up_reference",
]

DEFAULT_THRESHOLD = 1e6
TOO_LARGE = 1e150
# Records buffered before the warm-up check has a reference. With 20 Gaussian records the MAD
# would have to come out 100x too small (10 of 20 deviations within 0.01 sd of the median, odds
# around 1e-19) for a 5-sd record to reach 1000 robust sds.
MIN_REFERENCE = 20
_MAD_TO_SD = 1.4826  # sd / MAD for a normal distribution


@dataclasses.dataclass(frozen=True)
class OutlierScreen:
    """Which rows of a batch the guard refuses, and why.

    Attributes
    ----------
    distance : (n,)
        Each row's squared distance (inf for a value that is too large; 0 when not checked).
    outlier : (n,) bool
        True for a row that is refused.
    """

    distance: np.ndarray
    outlier: np.ndarray
    threshold: float | None
    names: tuple  # the column of each value (None: a regression's target)
    rows: np.ndarray  # the values screened, (n, len(names))
    what: np.ndarray  # per row: which rule spoke (an index into _WHAT)
    blame: np.ndarray  # per row: the feature most to blame

    def reason(self, i: int) -> str:
        """Why row i is refused: the rule, the distance, the threshold and the feature most to blame."""
        return str(self.error(i))

    def error(self, i: int) -> OutlierError:
        row = self.rows[i]
        if not np.isfinite(self.distance[i]) and self.what[i] == TOO_LARGE_RULE:
            j = int(np.nanargmax(np.abs(row)))
            return OutlierError(
                f"outlier: {_label(self.names[j])} is {row[j]:.3g}, too large for the model's statistics "
                f"(|value| must stay below {TOO_LARGE:.0e}, its square would overflow)",
                feature=self.names[j],
                value=float(row[j]),
            )
        j = int(self.blame[i])
        return OutlierError(
            f"outlier: {_WHAT[self.what[i]].format(f'{self.distance[i]:.3g}')} (threshold {self.threshold:.3g}); "
            f"{_label(self.names[j])} is {row[j]:.6g}",
            feature=self.names[j],
            value=float(row[j]),
            distance=float(self.distance[i]),
        )


TOO_LARGE_RULE, MAHALANOBIS, SPREAD, WARM_UP = range(4)
_WHAT = {
    TOO_LARGE_RULE: "value too large",
    MAHALANOBIS: "squared Mahalanobis distance {} under the closest component",
    SPREAD: "squared distance {} of the target and features from their running means, in running variances",
    WARM_UP: "squared robust distance {} from the warm-up records' median, in robust variances",
}


def _label(name) -> str:
    return "the target" if name is None else f"feature {name!r}"


def too_large(rows: np.ndarray) -> np.ndarray:
    """(n,) True for a row holding a value whose square would overflow the statistics."""
    if rows.size == 0 or (rows.max() < TOO_LARGE and rows.min() > -TOO_LARGE):  # no temporary (NaN: slow path)
        return np.zeros(rows.shape[0], dtype=bool)
    with np.errstate(invalid="ignore"):
        return (np.abs(rows) >= TOO_LARGE).any(axis=1)


def robust_reference(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median, robust sd) of each column of the warm-up rows (NaN = missing, ignored).

    The robust sd is 1.4826 MAD; where the MAD is 0 (a feature mostly constant, e.g. a flag),
    1.2533 x the mean absolute deviation (the sd for normal data); where that is 0 too (a
    constant so far), max(|median|, 1): no spread seen, so a change is judged by its size.
    """
    if rows.shape[0] and not np.isnan(rows).any():
        # the usual case, in a sort of each column (the same numbers as np.median, ~5x faster: a cold
        # keyed model computes a reference every time its buffer doubles, thousands of keys a second)
        with np.errstate(all="ignore"):  # a value too large for its square: refused anyway, inf here
            centre = _column_medians(rows)
            deviation = np.abs(rows - centre)
            scale = _MAD_TO_SD * _column_medians(deviation)
            mean_deviation = 1.2533 * deviation.mean(axis=0)
    else:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column all NaN (never judged): centre 0 below
            centre = np.nanmedian(rows, axis=0)
            deviation = np.abs(rows - centre)
            scale = _MAD_TO_SD * np.nanmedian(deviation, axis=0)
            mean_deviation = 1.2533 * np.nanmean(deviation, axis=0)
    centre = np.where(np.isnan(centre), 0.0, centre)
    scale = np.where(scale > 0, scale, np.where(mean_deviation > 0, mean_deviation, np.maximum(np.abs(centre), 1.0)))
    return centre, scale


def _column_medians(rows: np.ndarray) -> np.ndarray:
    """Each column's median, as np.median computes it (the middle value, or the mean of the middle two)."""
    ordered = np.sort(rows, axis=0)
    middle = rows.shape[0] // 2
    if rows.shape[0] % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def robust_distance(rows: np.ndarray, reference) -> tuple[np.ndarray, np.ndarray]:
    """Squared robust distance of each row from the reference, and the feature contributing most."""
    centre, scale = reference
    with np.errstate(over="ignore", invalid="ignore"):
        z = ((rows - centre) / scale) ** 2
    z = np.where(np.isnan(z), 0.0, z)
    return z.sum(axis=1), z.argmax(axis=1)


def make_screen(
    rows: np.ndarray,
    names,
    threshold: float | None,
    distance: np.ndarray,
    what: np.ndarray | int,
    blame: np.ndarray,
) -> OutlierScreen:
    """The screen of rows whose distances are computed; rows too large are marked here."""
    n = rows.shape[0]
    what = np.full(n, what) if isinstance(what, (int, np.integer)) else what
    huge = np.zeros(n, dtype=bool)
    if n and not (rows.max() < TOO_LARGE and rows.min() > -TOO_LARGE):  # the usual case skips this (NaN: not)
        huge = too_large(rows)
        if huge.any():
            distance = np.where(huge, np.inf, distance)
            what = np.where(huge, TOO_LARGE_RULE, what)
    outlier = huge if threshold is None else huge | ~(distance <= threshold)  # NaN counts as too far
    return OutlierScreen(distance, outlier, threshold, tuple(names), rows, what, blame)


def screen_against(
    rows: np.ndarray, names, reference_rows: np.ndarray | None, threshold: float | None
) -> OutlierScreen:
    """Screen rows by their robust distance from `reference_rows` (the warm-up rule, for records
    buffered outside a model), once there are `MIN_REFERENCE` of them; the too-large rule always."""
    n = rows.shape[0]
    distance, blame = np.zeros(n), np.zeros(n, dtype=int)
    if threshold is not None and reference_rows is not None and len(reference_rows) >= MIN_REFERENCE:
        distance, blame = robust_distance(rows, robust_reference(reference_rows))
    return make_screen(rows, names, threshold, distance, WARM_UP, blame)


def reference_size(n_buffered: int) -> int:
    """How many of `n_buffered` (>= 20) warm-up rows the reference is taken from: 20, 40, 80, ..."""
    return MIN_REFERENCE * 2 ** int(math.log2(n_buffered / MIN_REFERENCE))


def warm_up_reference(buffered: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The warm-up rule's reference for `rows` arriving after `buffered` (both as judged).

    Once 20 rows are buffered: the median and robust spread of the first 20, 40, 80, ... of them
    (refreshed as the buffer doubles, so a record's reference depends only on how many came before
    it). Before: of the buffered rows and these together, once they make 20 (a median that one
    absurd record cannot move, so a fresh model's first records are screened too). None: fewer.
    `OnlineGMM` / `OnlineRegressionMixture` and the Kafka consumer's --replicate share this rule.
    """
    if len(buffered) >= MIN_REFERENCE:
        return robust_reference(buffered[: reference_size(len(buffered))])
    if len(buffered) + len(rows) >= MIN_REFERENCE:
        return robust_reference(np.vstack([buffered, rows]))
    return None


def screen_warm_up(rows: np.ndarray, names, buffered: np.ndarray, threshold: float | None) -> OutlierScreen:
    """Screen rows arriving after `buffered` warm-up rows by `warm_up_reference`; the too-large rule always."""
    n = rows.shape[0]
    distance, blame = np.zeros(n), np.zeros(n, dtype=int)
    reference = None if threshold is None else warm_up_reference(buffered, rows)
    if reference is not None:
        distance, blame = robust_distance(rows, reference)
    return make_screen(rows, names, threshold, distance, WARM_UP, blame)
