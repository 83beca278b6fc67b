"""What the two online estimators share: mini-batch buffering, warm-up, stepwise updates.

Records go into one buffer whether they come from `learn_one` or `learn_many`, and
the model updates each time the buffer fills, so both paths give the same model.
The first `warmup` records initialise it with the batch core; after that every
`batch_size` records make one stepwise-EM update.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from streamem._validation import check_n_components, check_positive
from streamem.engines.stepwise import StepwiseEM
from streamem.exceptions import ConvergenceWarning
from streamem.schedules import StepSize
from streamem.state import FORMAT_VERSION, StateError, checked_statistics, parse_state

__all__ = ["OnlineMixture"]

logger = logging.getLogger(__name__)


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

    def _reset(self) -> None:
        self.n_seen = 0
        self._buffer: np.ndarray | None = None
        self._count = 0
        self._engine: StepwiseEM | None = None
        self._scorer = None

    @property
    def _schedule(self) -> StepSize:
        return self.step if self.step is not None else StepSize()

    @property
    def is_warm(self) -> bool:
        """True once the warm-up records have initialised the model."""
        return self._engine is not None

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

    def _push_row(self, row) -> None:
        self._ensure_buffer(self._width())
        self._buffer[self._count] = row
        self._count += 1
        self.n_seen += 1
        if self._count == self._buffer.shape[0]:
            self._flush(self._buffer)

    def _push_rows(self, rows: np.ndarray) -> None:
        start, n = 0, rows.shape[0]
        while start < n:
            capacity = self._capacity()
            if self._count == 0 and n - start >= capacity:
                # a whole mini-batch is at hand: update from it without copying
                self.n_seen += capacity
                self._flush(rows[start : start + capacity])
                start += capacity
                continue
            self._ensure_buffer(rows.shape[1])
            take = min(capacity - self._count, n - start)
            self._buffer[self._count : self._count + take] = rows[start : start + take]
            self._count += take
            self.n_seen += take
            start += take
            if self._count == capacity:
                self._flush(self._buffer)

    def _flush(self, rows: np.ndarray) -> None:
        """Learn from a full buffer: the warm-up fit, or one stepwise update."""
        self._count = 0
        self._scorer = None
        if self._engine is None:
            self._warm_up(rows)
            self._buffer = None  # capacity changes from warmup to batch_size
        else:
            self._engine.update(self._prepare(rows, self._engine.stats.shift))

    def _warm_up(self, rows: np.ndarray) -> None:
        family = self._family()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            params = self._warm_up_params(rows)
        batch = self._prepare(rows, None)
        stats = family.expected_stats(batch, params)[2].scaled(1.0 / rows.shape[0])
        averaging = None if self.averaging is None else rows.shape[0] / self.batch_size + self.averaging
        self._engine = StepwiseEM(
            family=family,
            stats=stats,
            params=family.m_step(stats),
            # the warm-up counts as warmup / batch_size mini-batches already averaged
            n_updates=rows.shape[0] / self.batch_size,
            schedule=self._schedule,
            averaging_start=averaging,
        )
        logger.info("%s warmed up on %d records", type(self).__name__, rows.shape[0])

    def _start_from_statistics(self, stats) -> None:
        """Start stepwise from given statistics, counted as a warm-up of `warmup` records."""
        family = self._family()
        averaging = None if self.averaging is None else self.warmup / self.batch_size + self.averaging
        self._engine = StepwiseEM(
            family=family,
            stats=stats,
            params=family.m_step(stats),
            n_updates=self.warmup / self.batch_size,
            schedule=self._schedule,
            averaging_start=averaging,
        )
        self._buffer = None
        self._count = 0
        self._scorer = None

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
        import inspect

        params = {
            name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters if name != "self"
        }
        params["step"] = None if self.step is None else self.step._get_params()
        if params.get("features") is not None:
            params["features"] = list(params["features"])
        return {
            "format": f"streamem.{type(self).__name__}",
            "version": FORMAT_VERSION,
            "params": params,
            "features": self._feature_list(),
            "n_seen": self.n_seen,
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
        d = None if state.features is None else len(state.features)
        if state.buffer and (d is None or any(len(row) != model._row_width(d) for row in state.buffer)):
            raise StateError("model state buffer rows do not match the number of features")
        if state.engine is not None:
            if d is None:
                raise StateError("model state has statistics but no feature names")
            checked = checked_statistics(state.engine.stats, model._statistics_shapes(d))
            model._restore_engine(state.engine.model_copy(update={"stats": checked}), model._stats_type)
        # the warm-up buffer is restored after the engine: its capacity depends on warmth
        model._restore_buffer(state.buffer)
        return model

    def _engine_state(self) -> dict | None:
        if self._engine is None:
            return None
        engine = self._engine
        return {
            "n_updates": engine.n_updates,
            "stats": {name: value.tolist() for name, value in engine.stats.to_arrays().items()},
            "averaged": None
            if engine.averaged is None
            else {name: np.asarray(getattr(engine.averaged, name)).tolist() for name in engine.family.param_fields},
            "n_averaged": engine.n_averaged,
        }

    def _restore_engine(self, state, stats_type) -> None:
        family = self._family()
        stats = stats_type(**{name: np.asarray(value, dtype=float) for name, value in state.stats.items()})
        averaging = None
        if self.averaging is not None:
            averaging = self.warmup / self.batch_size + self.averaging
        self._engine = StepwiseEM(
            family=family,
            stats=stats,
            params=family.m_step(stats),
            n_updates=state.n_updates,
            schedule=self._schedule,
            averaging_start=averaging,
            averaged=None
            if state.averaged is None
            else family.make_params(*[np.asarray(state.averaged[name]) for name in family.param_fields]),
            n_averaged=state.n_averaged,
        )

    def _buffered_rows(self) -> list:
        return [] if self._buffer is None else self._buffer[: self._count].tolist()

    def _restore_buffer(self, rows: list) -> None:
        self._buffer = None
        self._count = 0
        if rows:
            array = np.asarray(rows, dtype=float)
            self._ensure_buffer(array.shape[1])
            self._buffer[: len(array)] = array
            self._count = len(array)
