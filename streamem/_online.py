"""What the two online estimators share: mini-batch buffering, warm-up, stepwise updates.

Records go into one buffer whether they come from `learn_one` or `learn_many`, and
the model updates each time the buffer fills, so both paths give the same model.
The first `warmup` records initialise it with the batch core; after that every
`batch_size` records make one stepwise-EM update.

Every record passes the outlier guard (`streamem.outliers`) before it enters the buffer,
screened with the parameters it would be learned with (they change only when the buffer is
flushed), so `learn_one` and `learn_many` refuse the same records.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import warnings

import numpy as np

from streamem import outliers as guard
from streamem._validation import check_choice, check_n_components, check_positive
from streamem.engines.stepwise import StepwiseEM
from streamem.exceptions import ConvergenceWarning, OutlierError
from streamem.families.base import Summary, check_statistics_fit
from streamem.families.cold_kernels import robust_distances
from streamem.schedules import StepSize
from streamem.state import FORMAT_VERSION, StateError, parse_state

__all__ = ["OUTLIER_MODES", "OnlineMixture"]

# "raise": an outlier raises OutlierError; "skip": it is dropped and counted in n_outliers;
# "learn": no distance check (a value too large for the statistics still raises).
OUTLIER_MODES = ("raise", "skip", "learn")

logger = logging.getLogger(__name__)

_REFUSED_BEFORE = -2  # the origin of a warm-up row a re-warm took from the refused records


def check_distinct(models) -> None:
    """`assign_and_learn_each`'s models: at least one, each once (a model's second batch would be
    answered from the state before its first), all with one number of components."""
    if not models:
        raise ValueError("assign_and_learn_each needs at least one model")
    if len({id(model) for model in models}) != len(models):
        raise ValueError("a model appears twice in assign_and_learn_each: give it its rows as one batch")
    if len({model.n_components for model in models}) > 1:
        raise ValueError("assign_and_learn_each answers models of one n_components (one responsibilities array)")


class OnlineMixture:
    """Mixin with the buffer / warm-up / update cycle (not public).

    Subclasses provide `_family()`, `_warm_up_params(rows)` (batch EM on the warm-up
    rows), `_prepare(rows, shift)` and `_width()`, and call `_reset()` in `__init__`.
    """

    def _check_online_params(self) -> None:
        check_n_components(self.n_components)
        check_positive(self.batch_size, "batch_size", integer=True)
        check_positive(self.warmup, "warmup", integer=True)
        if self.warmup < self.n_components:
            raise ValueError(f"warmup must be >= n_components={self.n_components}, got {self.warmup}")
        if self.step is not None and not isinstance(self.step, StepSize):
            raise ValueError(f"step must be a streamem.schedules.StepSize or None, got {self.step!r}")
        if self.averaging is not None:
            check_positive(self.averaging, "averaging", integer=True, allow_zero=True)
        check_choice(self.outliers, "outliers", OUTLIER_MODES)
        if self.outlier_threshold is not None:
            check_positive(self.outlier_threshold, "outlier_threshold")

    def _reset(self) -> None:
        self.n_seen = 0
        self.n_outliers = 0
        self.skipped_: list | tuple = ()  # (row position, OutlierError) skipped by the last learn call
        self._reference: tuple | None = None  # (rows it was taken from, warm-up robust reference)
        self._fast: tuple | None = None  # (what it was computed from, centre, radius) for _quick_pass
        self._scored: tuple | None = None  # (prepared batch, its log-densities) from the last screen
        self._buffer: np.ndarray | None = None
        self._count = 0
        self._engine: StepwiseEM | None = None
        self._pending = None  # statistics applied since the last update, fewer than batch_size records
        self._scorer = None
        self._screened = 0  # records screened so far: the moved-stream window counts from it
        self._refused: list = []  # (screened index, row) refused by the distance rule in the last window
        self._moved = False  # the window says the stream has moved: re-warm before the next record
        self._calls = 0  # learn calls so far: tells a warm-up row of this call from an earlier one
        self._origins: list = []  # (call, position in it) of each warm-up buffer row, for skipped_

    @property
    def _schedule(self) -> StepSize:
        return self.step if self.step is not None else StepSize()

    @property
    def is_warm(self) -> bool:
        """True once the warm-up records have initialised the model."""
        return self._engine is not None

    @property
    def statistics_(self):
        """The running statistics, per record (their count is 1): what the parameters are the M-step
        of. None until the model is warm."""
        return None if self._engine is None else self._engine.stats

    @property
    def warmup_needed(self) -> int:
        """Records the model still takes before its warm-up fit (0 once warm)."""
        return 0 if self._engine is not None else self.warmup - self._count

    @property
    def records_until_update(self) -> int:
        """Records until the model next changes: those its warm-up still needs, or, once warm, those
        `apply` still has to pool before its next update (the buffer of `learn_many` is apart)."""
        if self._engine is None:
            return self.warmup_needed
        pooled = 0 if self._pending is None else self._pending.count
        return max(1, math.ceil(self.batch_size - pooled - 1e-9))

    @property
    def n_updates(self) -> float:
        """Stepwise updates so far (the warm-up counts as warmup / batch_size of them)."""
        return 0.0 if self._engine is None else self._engine.n_updates

    # -- the buffer ---------------------------------------------------------------------
    def _capacity(self) -> int:
        return self.batch_size if self.is_warm else self.warmup

    def _ensure_buffer(self, width: int) -> None:
        if self._buffer is None or self._buffer.shape != (self._capacity(), width):
            old, self._buffer = self._buffer, np.empty((self._capacity(), width))
            if old is not None and self._count:
                self._buffer[: self._count, : old.shape[1]] = old[: self._count]

    # -- the outlier guard ------------------------------------------------------------------
    def set_outlier_rule(self, outliers: str, outlier_threshold: float | None) -> None:
        """Change `outliers` and `outlier_threshold` of a live model (say, one restored from a
        checkpoint written with other values); checked as in `__init__`. Nothing learned changes."""
        if (outliers, outlier_threshold) == (self.outliers, self.outlier_threshold):
            return
        previous = self.outliers, self.outlier_threshold
        self.outliers, self.outlier_threshold = outliers, outlier_threshold
        try:
            self._check_online_params()
        except ValueError:
            self.outliers, self.outlier_threshold = previous
            raise
        self._fast = None

    @property
    def _distance_rule(self) -> bool:
        return self.outliers != "learn" and self.outlier_threshold is not None

    def _screen_rows(
        self, rows: np.ndarray, names, batch=None, values_fit: bool = False, log_prob=None
    ) -> guard.OutlierScreen | None:
        """Screen rows in the buffer's layout (extra trailing columns only get the too-large rule).

        `batch`: the rows already prepared for the next update; a family that scores them anyway
        keeps that work for the update (see `_push_rows`). `values_fit`: the caller checked that
        no value is too large; then None means no row is refused (the learning paths' fast exit).
        `log_prob`: the rows' component log-densities under the predictive parameters, if the
        caller has them (`assign_and_screen_many`)."""
        n, width = rows.shape[0], self._width()
        distance, what, blame = None, guard.WARM_UP, None
        if self._distance_rule and n:
            judged = self._judged(rows[:, :width])
            if self._engine is not None:
                distance, what, blame, reusable = self._model_distances(judged, batch, log_prob)
                self._scored = None if reusable is None else (batch, reusable)
            else:
                reference = self._warm_up_reference()  # cached, once 20 are buffered
                if reference is None:  # the first records: with those buffered (`guard.warm_up_reference`)
                    buffered = self._judged(self._buffer[: self._count, :width]) if self._count else judged[:0]
                    reference = guard.warm_up_reference(buffered, judged)
                if reference is not None:  # compiled: a cold keyed model screens thousands of small batches
                    distance, blame = robust_distances(np.ascontiguousarray(judged, dtype=float), *reference)
        if values_fit and (distance is None or distance.max() <= self.outlier_threshold):  # NaN: not <=
            return None
        if distance is None:
            distance, blame = np.zeros(n), np.zeros(n, dtype=int)
        threshold = self.outlier_threshold if self._distance_rule else None
        return guard.make_screen(rows, names, threshold, distance, what, blame)

    def _judged(self, rows: np.ndarray) -> np.ndarray:
        """The values the distance rule judges, NaN where it should not look (subclasses)."""
        return rows

    def _warm_up_reference(self):
        """Median and robust spread of the first 20, 40, 80, ... buffered warm-up rows (None: too few).

        Refreshed each time the buffer doubles, so a record's reference depends only on how many
        records came before it: `learn_one` and `learn_many` screen alike, and after a restore too.
        """
        if self._count < guard.MIN_REFERENCE:
            return None
        size = guard.reference_size(self._count)
        if self._reference is None or self._reference[0] != size:
            self._reference = (size, guard.robust_reference(self._judged(self._buffer[:size, : self._width()])))
        return self._reference[1]

    def _screen_span(self, capacity: int) -> int:
        """How many more rows share the current screen (the parameters, or the warm-up reference)."""
        span = capacity - self._count
        if self._refused and self._distance_rule:
            # refusals in the window: end the span where the next ones would say the stream has moved,
            # so a shift costs at most `batch_size` refused records however the spans fall
            recent = sum(1 for i, _ in self._refused if i >= self._screened - self.batch_size)
            if recent:
                span = min(span, max(1, self.batch_size // 2 + 1 - recent))
        if self._engine is None and self._distance_rule:
            if self._count < guard.MIN_REFERENCE:
                return min(span, guard.MIN_REFERENCE - self._count)
            span = min(span, 2 * guard.reference_size(self._count) - self._count)
        return span

    def _guarded(self, rows: np.ndarray, labels=None, screen=None, offset: int = 0, values_fit: bool = False):
        """The rows to learn: outliers raise `OutlierError` (the first one, naming its row) or are
        skipped and counted, as `outliers` says. A value too large always raises, unless skipped."""
        if screen is None:
            screen = self._screen_rows(rows, self._screen_names(), values_fit=values_fit)
        if screen is None or not screen.outlier.any():
            return rows
        if self.outliers == "skip":
            self.n_outliers += int(screen.outlier.sum())
            self.skipped_ = [
                *self.skipped_,
                *((offset + int(i), screen.error(i)) for i in np.flatnonzero(screen.outlier)),
            ]
            self._note_refused(rows, screen, offset)
            return rows[~screen.outlier]
        i = int(np.argmax(screen.outlier))
        error = screen.error(i)
        if labels is not None:
            error = OutlierError(f"row {labels[i]!r}: {error}", **_details(error))
        raise error

    # -- a stream that has moved -------------------------------------------------------------
    # Outliers are rare by definition: for Gaussian data P(squared distance > 1e6) < 1e-200000, and
    # the heaviest real tails measured (benchmarks/outliers.py) stay below 1e3. So when more than half
    # of the last `batch_size` screened records are refused by the distance rule, they are not
    # outliers: the stream has moved (a feature constant at 0 now reads 1, with variance reg_covar
    # = 1e-6: 1e6 squared sds; a sensor with sd 0.001 shifting by 5: 2.5e7). Refused records are
    # never learned, so a model judging by its old parameters would refuse the new level for ever.
    # The guard then re-warms: the old statistics are dropped and the refused records of the window
    # (at most batch_size; they stay reported as refused) start a new warm-up (they are the evidence
    # for the new level), which later records pass by the warm-up reference; `warmup` records
    # later the model is warm on the new level. Isolated absurd records (one in 10 is still 5 in
    # 50) never get there, nor do values too large; a burst of absurd records that does costs the
    # old statistics, but the warm-up fit leaves the burst out (the whole buffer's median is the
    # records after it).
    # With "raise" nothing changes: the caller sees every refusal and decides.

    def _note_refused(self, rows: np.ndarray, screen: guard.OutlierScreen, offset: int) -> None:
        """Keep the rows the distance rule refused (skip mode) in the window; flag a moved stream."""
        if not self._distance_rule:
            return
        refused = np.flatnonzero(screen.outlier & (screen.what != guard.TOO_LARGE_RULE))
        if not refused.size:
            return
        window, base = self.batch_size, self._screened - rows.shape[0]
        self._refused = [(i, row) for i, row in self._refused if i >= self._screened - window]
        self._refused.extend((base + int(i), (self._calls, offset + int(i), rows[i].copy())) for i in refused)
        self._refused = [(i, row) for i, row in self._refused if i >= self._screened - window]
        self._moved = len(self._refused) > window // 2

    def _rewarm(self) -> None:
        """The stream has moved: drop the learned statistics and warm up again from the refused records."""
        taken = self._refused
        self._moved, self._refused = False, []
        logger.warning(
            "%s: %d of the last %d records screened were beyond the outlier threshold %.3g: the stream has "
            "moved, not a run of outliers; warming up again from those %d records (the statistics of %d "
            "updates are dropped)",
            type(self).__name__,
            len(taken),
            self.batch_size,
            self.outlier_threshold,
            len(taken),
            int(self.n_updates),
        )
        width = self._buffer.shape[1] if self._buffer is not None else max(row.shape[0] for _, (_, _, row) in taken)
        rows = np.zeros((len(taken), width))
        for j, (_, (_, _, row)) in enumerate(taken):
            rows[j, : row.shape[0]] = row  # a regression may have widened since (new features read 0)
        # They stay reported (skipped_, n_outliers): they were refused when they came, and a burst of
        # absurd records that looked like a move is left out again by the new warm-up fit, whose
        # whole-buffer median the records after it set.
        self._engine, self._buffer, self._count, self._origins, self._pending = None, None, 0, [], None
        self._scorer = self._reference = self._fast = self._scored = None
        for row in rows:
            self._ensure_buffer(width)
            self._buffer[self._count] = row
            self._origins.append((_REFUSED_BEFORE, 0))  # reported and counted already, when refused
            self._count += 1
            self.n_seen += 1
            if self._count == self._buffer.shape[0]:
                self._flush(self._buffer)

    def _transaction(self):
        """A context that restores the whole state if learning raises (a frame's later mini-batches
        are screened with parameters its earlier ones produced, so a refusal can come mid-frame)."""
        return _Rollback(self)

    def _quick_pass(self, row: list) -> bool:
        """True when the record surely passes the guard, by one distance computed in C (math.dist,
        ~0.3 us): `learn_one` then skips the full screen (~40 us), which only runs on a miss.

        The bound is a ball around a centre: for a warm Gaussian mixture, D2_k <= tr(S_k^-1)
        |x - m_k|^2 <= tr(S_k^-1) (|x - c| + |m_k - c|)^2, so |x - c| <= max_k (sqrt(t / tr(S_k^-1))
        - |m_k - c|) keeps D2_k <= t for some k; for per-feature scales s_j (warm-up reference,
        regression spread), |x - c| <= sqrt(t) min_j s_j. The ball also stays inside |x_j| < 1e150.
        """
        key = None
        if self._distance_rule:
            if self._engine is not None:
                key = self._params()
            elif self._count >= guard.MIN_REFERENCE:
                key = self._warm_up_reference()
        if key is None:
            if self._distance_rule and self._engine is None and self._count == guard.MIN_REFERENCE - 1:
                return False  # the 20th record is screened with the 19 before it (`_screen_rows`)
            return max(row) < guard.TOO_LARGE and min(row) > -guard.TOO_LARGE
        fast = self._fast
        if fast is None or fast[0] is not key:
            centre, radius = self._ball(key)
            radius = min(radius, guard.TOO_LARGE - float(np.abs(centre).max()))
            fast = self._fast = (key, centre.tolist(), radius)
        try:
            return math.dist(row, fast[1]) <= fast[2]  # NaN (a missing value) compares False
        except (TypeError, ValueError):
            return False

    def _ball(self, key) -> tuple[np.ndarray, float]:
        """(centre, radius) of `_quick_pass` for the warm-up reference; subclasses add the model's."""
        centre, scale = key
        return centre, math.sqrt(self.outlier_threshold) * float(scale.min())

    def _push_row(self, row) -> None:
        self.skipped_ = ()
        self._screened += 1
        self._calls += 1
        if not self._quick_pass(row) and not self._guarded(np.array([row], dtype=float)).shape[0]:
            if self._moved:
                self._rewarm()
            return
        self._ensure_buffer(self._width())
        self._buffer[self._count] = row
        if self._engine is None:
            self._origins.append((self._calls, 0))
        self._count += 1
        self.n_seen += 1
        if self._count == self._buffer.shape[0]:
            self._flush(self._buffer)

    def _push_rows(self, rows: np.ndarray, labels=None) -> None:
        self.skipped_ = ()
        self._calls += 1
        start, n = 0, rows.shape[0]
        # one check of the whole frame for values too large (NaN, a missing value, takes the slow path)
        values_fit = n == 0 or bool(rows.max() < guard.TOO_LARGE and rows.min() > -guard.TOO_LARGE)
        guarded = self._distance_rule or not values_fit
        while start < n:
            if self._moved:
                self._rewarm()
            capacity = self._capacity()
            span = min(self._screen_span(capacity), n - start)
            self._screened += span
            chunk, chunk_labels = rows[start : start + span], None if labels is None else labels[start : start + span]
            offset, start = start, start + span
            skipped = len(self.skipped_)
            if guarded and self._count == 0 and span == capacity and self._engine is not None:
                if values_fit and self._learn_screened(chunk):  # the family screens and learns in one pass
                    continue
                # A whole mini-batch is at hand: screen it as the update will see it, so the
                # update reuses the screen's log-densities (one pass over the rows, not two).
                batch = self._prepare(chunk, self._engine.stats.shift)
                screen = self._screen_rows(chunk, self._screen_names(), batch, values_fit)
                if screen is None or not screen.outlier.any():
                    self.n_seen += capacity
                    self._flush(chunk, batch)
                    continue
                chunk = self._guarded(chunk, chunk_labels, screen, offset)
            elif guarded:
                chunk = self._guarded(chunk, chunk_labels, offset=offset, values_fit=values_fit)
            take = chunk.shape[0]
            if take == 0:
                continue
            if self._engine is None:  # where each warm-up row came from, for `_screened_warm_up`
                gone = {position for position, _ in self.skipped_[skipped:]} if take < span else ()
                self._origins.extend((self._calls, p) for p in range(offset, offset + span) if p not in gone)
            if self._count == 0 and take == capacity:
                # a whole mini-batch is at hand: update from it without copying
                self.n_seen += capacity
                self._flush(chunk)
                continue
            self._ensure_buffer(rows.shape[1])
            self._buffer[self._count : self._count + take] = chunk
            self._count += take
            self.n_seen += take
            if self._count == capacity:
                self._flush(self._buffer)
        if self._moved:
            self._rewarm()

    def _learn_screened(self, rows: np.ndarray) -> bool:
        """Learn a whole mini-batch of a warm model if the family screens and summarises it in one pass
        (`_screened_statistics`) and no record is refused: what screening then `_flush` would do, for
        less. False: nothing was done (a record is beyond the threshold, or the family cannot)."""
        stats = self._screened_statistics(rows)
        if stats is None:
            return False
        self.n_seen += rows.shape[0]
        self._count = 0
        self._scorer = self._reference = self._scored = None
        self._engine.apply(stats, 1.0 / rows.shape[0])
        return True

    def _screened_statistics(self, rows: np.ndarray):
        """The statistics of rows (no value too large, none missing) if none is refused by the distance
        rule, from the family's one-pass screen; None where a subclass has none."""
        return None

    def _flush(self, rows: np.ndarray, batch=None) -> None:
        """Learn from a full buffer: the warm-up fit, or one stepwise update (from `batch`, the
        rows prepared and maybe already scored by the screen, when given)."""
        self._count = 0
        self._scorer = None
        self._reference = None
        if self._engine is None:
            origins, self._origins = self._origins, []
            self._warm_up(self._screened_warm_up(rows, origins))
            self._buffer = None  # capacity changes from warmup to batch_size
        else:
            scored, self._scored = self._scored, None
            if batch is None:
                batch = self._prepare(rows, self._engine.stats.shift)
            self._engine.update(batch, scored[1] if scored is not None and scored[0] is batch else None)

    def _screened_warm_up(self, rows: np.ndarray, origins: list) -> np.ndarray:
        """The warm-up rows without those beyond the threshold from the whole buffer's median:
        records that came while fewer than 20 were buffered and at hand had no reference, so they
        are checked here (left out of the fit and counted in `n_outliers`, whatever `outliers`
        says: they were accepted). Those of the current learn call are reported in `skipped_`;
        one from an earlier call can only be logged (a caller such as the Kafka consumer has
        answered it already; it sees such records only when a model's first 20 come in pieces)."""
        if not self._distance_rule:
            return rows
        judged = self._judged(rows[:, : self._width()])
        distance, blame = guard.robust_distance(judged, guard.robust_reference(judged))
        far = ~(distance <= self.outlier_threshold)
        if not far.any():
            return rows
        if len(origins) == rows.shape[0]:
            screen = guard.make_screen(
                rows[:, : self._width()], self._screen_names(), self.outlier_threshold, distance, guard.WARM_UP, blame
            )
            reported = [(origins[i][1], screen.error(i)) for i in np.flatnonzero(far) if origins[i][0] == self._calls]
            self.skipped_ = sorted([*self.skipped_, *reported], key=lambda entry: entry[0])
        dropped = int(far.sum())
        self.n_seen -= dropped
        self.n_outliers += dropped
        if len(origins) == rows.shape[0]:  # a re-warm's refused records are counted once
            self.n_outliers -= sum(origins[i][0] == _REFUSED_BEFORE for i in np.flatnonzero(far))
        logger.warning(
            "%s left %d warm-up record(s) out of its first fit: squared robust distance up to %.3g (threshold %.3g)",
            type(self).__name__,
            dropped,
            float(distance[far].max()),
            self.outlier_threshold,
        )
        return rows[~far]

    def _warm_up(self, rows: np.ndarray) -> None:
        self._start_engine(self._fitted_statistics(rows))
        logger.info("%s warmed up on %d records", type(self).__name__, rows.shape[0])

    def _start_engine(self, stats, n_updates: float | None = None, averaged=None, n_averaged: int = 0) -> None:
        """Start stepwise EM from statistics (sums over their records). The one place an engine is
        built: statistics of n records count as n / batch_size updates already made (so alpha = 1
        gives an exact running mean over everything they and later records summarise), and Polyak
        averaging starts `averaging` updates after that. A restored engine gives its own count
        (`n_updates`) and averages; its averaging started `averaging` updates after a warm-up of
        `warmup` records, the only start a state document records."""
        family = self._family()
        count = stats.count
        normalised = stats if math.isclose(count, 1.0, rel_tol=1e-12) else stats.scaled(1.0 / count)
        start = (count if n_updates is None else self.warmup) / self.batch_size
        self._engine = StepwiseEM(
            family=family,
            stats=normalised,
            params=family.m_step(normalised),
            n_updates=count / self.batch_size if n_updates is None else n_updates,
            schedule=self._schedule,
            averaging_start=None if self.averaging is None else start + self.averaging,
            averaged=averaged,
            n_averaged=n_averaged,
        )
        self._buffer = None  # capacity changes from warmup to batch_size
        self._count = 0
        self._scorer = self._reference = self._fast = self._scored = None
        self._origins = []
        self._pending = None

    # -- statistics: the public currency ------------------------------------------------------
    def initial_statistics(self, X, y=None):
        """Statistics to start a model from: batch EM on X (the warm-up fit: k-means++ and two
        restarts, as the model runs on its first `warmup` records), then one E-step; sums over
        X's rows. `apply` them to a cold model to warm it up (the Kafka consumer's replicas do).
        X as for `summarize`."""
        return self._fitted_statistics(self._summary_rows(X, y))

    def _fitted_statistics(self, rows: np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            params = self._warm_up_params(rows)
        return self._family().expected_stats(self._prepare(rows, None), params)[2]

    def summarize(self, X, y=None) -> Summary:
        """One E-step of a batch under the parameters the model learns with: `Summary(
        responsibilities (n, K), log_likelihood (n,), statistics)`, the statistics summed over
        the batch's records. Changes nothing; `apply(summary.statistics)` then learns the batch
        as one stepwise update, exactly as `learn_many` learns a mini-batch.

        X: a 2-D array with the model's features in order (`features_`), or a DataFrame; with
        Polyak averaging, `predict_*` use the averaged parameters and this the running ones.
        The outlier guard does not run here: screen the rows first (`screen_many`).
        """
        rows = self._summary_rows(X, y)
        if self._engine is not None:
            params, batch = self._engine.params, self._prepare(rows, self._engine.stats.shift)
        else:  # the provisional parameters the model answers with during its warm-up
            params, batch = self._params(), self._prepare(rows, None)
        log_likelihood, resp, stats = self._family().expected_stats(batch, params)
        return Summary(resp, log_likelihood, stats)

    def assign_and_learn_many(self, X, y=None):
        """Answer a batch with the model as it stands, then learn it, if the outlier guard refuses
        none of its rows: `assign_and_screen_many(X[, y])`, then `learn_many(X[, y])` when its screen
        refuses no row (prequential, as a `predict_one` / `learn_one` loop answers). Returns the
        answer; when the screen refuses a row, nothing is learned and the caller decides about the
        refused rows and the others. Rows the model still refuses while learning them (screened by
        what it became within the batch: its warm-up fit, a refreshed warm-up reference) are listed
        in `skipped_`, as for `learn_many`.

        A cold `OnlineGMM`'s small batches (one model per key) are answered, screened and buffered
        in one compiled call.

        >>> import numpy as np, streamem as se
        >>> model = se.OnlineGMM(2, features=("a", "b"), warmup=100)
        >>> responsibilities, log_likelihood, screen = model.assign_and_learn_many(np.array([[0.1, 0.2]]))
        >>> responsibilities.shape, bool(screen.outlier.any()), model.n_seen
        ((1, 2), False, 1)
        """
        answer = self.assign_and_screen_many(X) if y is None else self.assign_and_screen_many(X, y)
        if not answer[-1].outlier.any():
            if y is None:
                self.learn_many(X)
            else:
                self.learn_many(X, y)
        return answer

    @classmethod
    def assign_and_learn_each(cls, models, X, bounds, y=None):
        """`assign_and_learn_many` of many models, each on its own rows: model i answers and learns
        `X[bounds[i]:bounds[i + 1]]` (and `y`'s), as `models[i].assign_and_learn_many` would; each
        model at most once, all with one `n_components`, at least one (ValueError otherwise). The
        models answer in turn: an error (a row with a value missing, say) stops the call at that
        model, those before it having learned.

        Returns (responsibilities (n, K), log-likelihoods (n,), predictions (n,) or None, screens):
        `screens[i]` is model i's `OutlierScreen` when it refused a row (nothing of that model's rows
        was learned then), None when it learned them all.

        One model per key with a record or two each (the Kafka consumer's `--model-key`): cold
        `OnlineGMM`s are answered, screened and buffered in one compiled call for all of them.

        >>> import numpy as np, streamem as se
        >>> models = [se.OnlineGMM(2, features=("a", "b"), warmup=100) for _ in range(3)]
        >>> X = np.array([[0.1, 0.2], [1.0, 1.5], [0.3, 0.1], [2.0, 2.0]])
        >>> responsibilities, log_likelihood, predictions, screens = se.OnlineGMM.assign_and_learn_each(
        ...     models, X, [0, 1, 3, 4])
        >>> responsibilities.shape, [model.n_seen for model in models], screens
        ((4, 2), [1, 2, 1], [None, None, None])
        """
        check_distinct(models)
        answers = [
            model.assign_and_learn_many(X[a:b]) if y is None else model.assign_and_learn_many(X[a:b], y[a:b])
            for model, a, b in zip(models, bounds[:-1], bounds[1:], strict=True)
        ]
        return cls._joined_answers(answers)

    @staticmethod
    def _joined_answers(answers: list) -> tuple:
        """One (responsibilities, log-likelihoods, predictions or None, screens) of per-model answers."""
        screens = [answer[-1] if answer[-1] is not None and answer[-1].outlier.any() else None for answer in answers]
        predictions = None if len(answers[0]) == 3 else np.concatenate([answer[2] for answer in answers])
        return (
            np.vstack([answer[0] for answer in answers]),
            np.concatenate([answer[1] for answer in answers]),
            predictions,
            screens,
        )

    def statistics_of(self, X, responsibilities: np.ndarray, y=None):
        """The statistics of a batch from responsibilities an E-step under the parameters the model
        learns with gave already (`summarize`'s; `assign_many`'s and `assign_and_screen_many`'s too
        unless Polyak `averaging` is on, when those answer with the averaged parameters): what
        `summarize` would return, without a second E-step. Rows with missing values need
        `summarize` (their statistics are conditional expectations, not weighted sums)."""
        rows, resp = self._answered_rows(X, responsibilities, y)
        if self._engine is not None:
            return self._answered_statistics(rows, resp)
        return self._family().suff_stats(self._prepare(rows, None), resp)

    def _answered_statistics(self, rows: np.ndarray, resp: np.ndarray):
        """Statistics of checked rows about the running shift, from their responsibilities."""
        return self._family().suff_stats(self._prepare(rows, self._engine.stats.shift), resp)

    def learn_answered(self, X, responsibilities: np.ndarray, y=None) -> None:
        """Learn a warm model's rows from the responsibilities they were answered with (as for
        `statistics_of`): the same updates as `apply(statistics_of(chunk, ...))` chunk after chunk
        (the first chunk completing what `apply` has pooled, then whole mini-batches), with the rows
        and responsibilities checked once for the whole block. The Kafka consumer learns each poll so.

        >>> import numpy as np, streamem as se
        >>> X = np.random.default_rng(0).normal(size=(1000, 2))
        >>> model = se.OnlineGMM(2, features=("a", "b"), seed=0)
        >>> model.learn_many(X[:500])
        >>> responsibilities = model.assign_many(X[500:])[0]
        >>> model.learn_answered(X[500:], responsibilities)
        >>> model.n_seen
        1000
        """
        if self._engine is None:
            raise ValueError("a cold model learns its warm-up with learn_many before it learns answered rows")
        rows, resp = self._answered_rows(X, responsibilities, y)
        start, size = 0, self.records_until_update
        fused_stopped = -1  # where the fused call stopped: that mini-batch is learned alone
        while start < rows.shape[0]:
            # the fused call takes whole mini-batches, the first of them completing what `apply` pooled
            head = size if self._pending is not None else 0
            if start != fused_stopped and (head or size == self.batch_size):
                learned = self._engine.apply_answered(
                    rows[start:], resp[start:], self.batch_size, self.batch_size * (1 - 1e-9), head, self._pending
                )
                if learned:
                    self._pending = None
                    self._screened += learned  # as `_apply_checked` counts them
                    self.n_seen += learned
                    self._scorer = self._reference = self._fast = self._scored = None
                    start = fused_stopped = start + learned
                    size = self.batch_size
                    continue
            chunk = slice(start, start + size)
            self._apply_checked(self._answered_statistics(rows[chunk], resp[chunk]))
            start, size = start + size, self.batch_size

    def _answered_rows(self, X, responsibilities: np.ndarray, y=None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, responsibilities) of `statistics_of` and `learn_answered`, checked."""
        rows = self._summary_rows(X, y)
        resp = np.asarray(responsibilities, dtype=float)
        expected = (rows.shape[0], self.n_components)
        # min/max reductions, not np.allclose: this runs once a poll on the consumer's hot path
        normalised = resp.shape == expected and np.abs(resp.sum(axis=1) - 1.0).max(initial=0.0) <= 1e-6
        if not (normalised and resp.min(initial=0.0) >= 0):
            raise ValueError(f"responsibilities must be {expected} non-negative values, each row summing to 1")
        if np.isnan(rows).any():
            raise ValueError("rows with missing values: their statistics come from summarize")
        return rows, resp

    def apply(self, statistics) -> None:
        """Learn statistics (sums over their records, as `summarize`, `statistics_of` and
        `initial_statistics` give them; statistics add): `n_seen` grows by their count, and once
        the statistics applied since the last update summarise `batch_size` records or more, they
        make one stepwise update, `s = (1 - eta) s + eta pooled / pooled.count`, then the M-step
        (so statistics of one record at a time learn as `learn_one` does, a mini-batch at a time).
        A cold model starts from them instead (records waiting in its warm-up buffer are then
        learned after them). Statistics of another type or shape raise ValueError."""
        self._apply_checked(self._checked_statistics(statistics))

    def _apply_checked(self, stats) -> None:
        """`apply` of statistics known to fit this model."""
        count = stats.count
        if self._engine is not None:
            # records learned as statistics were screened by the caller (the Kafka consumer screens
            # every batch it answers): they count in the moved-stream window as screened and passed,
            # so isolated refusals age out of it
            self._screened += int(round(count))
            pooled = stats if self._pending is None else self._pending + stats
            if pooled.count >= self.batch_size * (1 - 1e-9):
                self._pending = None
                self._engine.apply(pooled, 1.0 / pooled.count)
                self._scorer = self._reference = self._fast = self._scored = None
            else:
                self._pending = pooled
        else:
            waiting = self._buffer[: self._count].copy() if self._count else None
            self._start_engine(stats)
            if waiting is not None:
                self._relearn(waiting)
        self.n_seen += int(round(count))

    def _relearn(self, rows: np.ndarray) -> None:
        """Learn rows already counted in n_seen (a warm-up buffer a start from statistics overtook)."""
        for start in range(0, rows.shape[0], self.batch_size):
            chunk = rows[start : start + self.batch_size]
            self._ensure_buffer(rows.shape[1])
            self._buffer[: chunk.shape[0]] = chunk
            self._count = chunk.shape[0]
            if self._count == self._buffer.shape[0]:
                self._flush(self._buffer)

    def _checked_statistics(self, statistics):
        features = self._feature_list()
        if not features:
            raise ValueError(f"the {type(self).__name__} does not know its features yet: give them first")
        expected = self._statistics_shapes(len(features))
        check_statistics_fit(statistics, type(self).__name__, self._stats_type, expected)
        return statistics

    def _start_from_fit(self, fit) -> None:
        """Start from a fit document's statistics (normalised per record), as if its records had
        been the warm-up."""
        stats = self._stats_type.from_dict(fit.statistics)
        expected = self._statistics_shapes(len(fit.features))
        if stats.shapes != expected:
            raise StateError(f"fit statistics have shapes {stats.shapes}, expected {expected}")
        self._start_engine(stats.scaled(fit.n_samples / stats.count))
        self.n_seen = fit.n_samples

    def _params(self):
        """Parameters to predict with: warm model, or the provisional one during warm-up."""
        if self._engine is not None:
            return self._engine.predictive_params
        return self._provisional_params(self._buffer[: self._count] if self._buffer is not None else None)

    # -- state as JSON ------------------------------------------------------------------
    # Subclasses provide: _stats_type, _statistics_shapes(d), _feature_list(), _set_features(names)
    # and _row_width(d) (the buffer's columns for d features).

    def to_dict(self) -> dict:
        """The model's whole state as a JSON-ready dict (statistics, counters, unlearned buffer)."""
        params = {name: getattr(self, name) for name in _init_parameters(type(self))}
        params["step"] = None if self.step is None else self.step.to_dict()
        if params.get("features") is not None:
            params["features"] = list(params["features"])
        return {
            "format": f"streamem.{type(self).__name__}",
            "version": FORMAT_VERSION,
            "params": params,
            "features": self._feature_list(),
            "n_seen": self.n_seen,
            "n_outliers": self.n_outliers,
            "buffer": self._buffered_rows(),
            "engine": self._engine_state(),
        }

    @classmethod
    def from_dict(cls, document):
        """Rebuild a model from `to_dict()` output (or its JSON text); raises `StateError` if invalid."""
        state = parse_state(document, f"streamem.{cls.__name__}")
        params = dict(state.params)
        if params.get("step") is not None:
            params["step"] = StepSize(**params["step"].model_dump())
        if params.get("features") is not None:
            params["features"] = tuple(params["features"])
        model = cls(**params)
        if state.features is not None:
            model._set_features(state.features)
        model.n_seen = state.n_seen
        model.n_outliers = state.n_outliers
        d = None if state.features is None else len(state.features)
        if state.buffer and (d is None or any(len(row) != model._row_width(d) for row in state.buffer)):
            raise StateError("model state buffer rows do not match the number of features")
        if state.engine is not None:
            if d is None:
                raise StateError("model state has statistics but no feature names")
            stats = model._stats_type.from_dict(state.engine.stats)
            if stats.shapes != model._statistics_shapes(d):
                raise StateError(
                    f"model state statistics have shapes {stats.shapes}, expected "
                    f"{model._statistics_shapes(d)} for its {d} features"
                )
            model._restore_engine(state.engine.model_copy(update={"stats": stats}))
            if state.engine.pending is not None:
                pending = model._stats_type.from_dict(state.engine.pending)
                if pending.shapes != stats.shapes or not pending.count > 0:
                    raise StateError(
                        f"model state pending statistics have shapes {pending.shapes}, expected "
                        f"{stats.shapes}, and must summarise at least one record"
                    )
                model._pending = pending
        # the warm-up buffer is restored after the engine: its capacity depends on warmth
        model._restore_buffer(state.buffer)
        return model

    def _engine_state(self) -> dict | None:
        if self._engine is None:
            return None
        engine = self._engine
        return {
            "n_updates": engine.n_updates,
            "stats": engine.stats.to_dict(),
            "averaged": None
            if engine.averaged is None
            else {name: np.asarray(getattr(engine.averaged, name)).tolist() for name in engine.family.param_fields},
            "n_averaged": engine.n_averaged,
            "pending": None if self._pending is None else self._pending.to_dict(),
            "averaging_start": engine.averaging_start,
        }

    def _restore_engine(self, state) -> None:
        family = self._family()
        averaged = None
        if state.averaged is not None:
            averaged = family.make_params(*[np.asarray(state.averaged[name]) for name in family.param_fields])
        self._start_engine(state.stats, state.n_updates, averaged, state.n_averaged)
        if state.averaging_start is not None and self.averaging is not None:
            self._engine.averaging_start = state.averaging_start  # where it was (states before it: the rule above)

    def _buffered_rows(self) -> list:
        return [] if self._buffer is None else self._buffer[: self._count].tolist()

    def _restore_buffer(self, rows: list) -> None:
        self._buffer = None
        self._count = 0
        self._reference = None
        self._origins = [(-1, 0)] * len(rows)  # learned in an earlier life: not reportable
        if rows:
            array = np.asarray(rows, dtype=float)
            self._ensure_buffer(array.shape[1])
            self._buffer[: len(array)] = array
            self._count = len(array)


class _Rollback:
    """Snapshot of a model's state, put back if the block raises.

    Shallow where that is enough: the engine's statistics and parameters are immutable objects
    that an update replaces (so a copy of the engine object keeps the old ones); the buffer,
    the feature lists and the generator's state are copied (a deep copy cost 1.2 ms per frame)."""

    def __init__(self, model):
        self.model = model
        self.saved = None

    def __enter__(self):
        if self.model.outliers != "skip":  # skipping never raises an OutlierError
            saved = dict(vars(self.model))
            for name, value in saved.items():
                if isinstance(value, (list, dict, np.ndarray)):
                    saved[name] = value.copy()
                elif isinstance(value, StepwiseEM):
                    saved[name] = copy.copy(value)
            self.saved = saved, self.model._rng.bit_generator.state
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None and self.saved is not None:
            saved, generator = self.saved
            vars(self.model).clear()
            vars(self.model).update(saved)
            self.model._rng.bit_generator.state = generator
        return False


def _details(error: OutlierError) -> dict:
    return {"feature": error.feature, "value": error.value, "distance": error.distance}


@functools.cache
def _init_parameters(cls) -> tuple[str, ...]:
    """The names `cls.__init__` takes (a checkpoint of thousands of keyed models asked inspect each time)."""
    return tuple(name for name in inspect.signature(cls.__init__).parameters if name != "self")
