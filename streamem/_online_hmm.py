"""What the online hidden Markov models share: the warm-up, the block-online engine, one filter per
stream, and the JSON state.

One model can follow several streams (the Kafka consumer's partitions) with shared parameters:
each stream is its own sequence, with its own filter and its own open block of records. River's
API uses the stream `None`. A subclass says how records become rows and a family batch, how the
warm-up is fitted, how its emission parameters are saved, how far a row is from a state, and (a
regression) how it forecasts (`_prepare`, `_warm_up_fit`, `_emission_document`, `_emission_params`,
`keep_states`, `_squared_distances`, `_forecasts`, `_cold_forecasts`).

Like every model, a warm one has `summarize(rows, stream)` (one E-step, nothing changes) and
`apply(statistics)` (one block-online update); `filter_and_learn` is the two, block by block.

A call that learns is all or nothing: if it fails (a warm-up fit or an M-step that cannot be made),
the model is put back as it was and ValueError says why, so a caller can refuse the rows and go on.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from streamem._validation import check_array, check_n_components, check_positive
from streamem.engines.baum_welch import HMMParams
from streamem.engines.block_online import BlockOnlineEM, block_statistics, one_sequence
from streamem.engines.markov_chain import filter_states
from streamem.families.base import Summary
from streamem.families.markov import HMMStats, check_hmm_statistics, checked_chain
from streamem.outliers import TOO_LARGE
from streamem.schedules import StepSize
from streamem.state import StateError, json_object

__all__ = ["OnlineHiddenMarkov", "Stream"]

FORMAT_VERSION = 1


@dataclasses.dataclass
class Stream:
    """One sequence: the filter before its open block (None: the stream has not started), the block's
    rows (`count` of `rows`), and the filter through the block's rows when it was last asked."""

    before: np.ndarray | None
    rows: np.ndarray
    count: int = 0
    latest: tuple[int, np.ndarray] | None = None

    def block(self) -> np.ndarray:
        return self.rows[: self.count]

    def extend(self, rows: np.ndarray) -> None:
        """Append rows to the open block, growing its buffer (up to a block) as needed."""
        end = self.count + rows.shape[0]
        if end > self.rows.shape[0]:
            grown = np.empty((max(end, 2 * self.rows.shape[0]), self.rows.shape[1]))
            grown[: self.count] = self.rows[: self.count]
            self.rows = grown
        self.rows[self.count : end] = rows
        self.count = end


def _check_stream(stream) -> None:
    if stream is not None and not isinstance(stream, (str, int)) or isinstance(stream, bool):
        raise TypeError(f"a stream is named by a str, an int or None, got {stream!r}")


def _buffer(width: int) -> np.ndarray:
    """An open block's first buffer: small, so that thousands of streams (or an absurd batch_size read
    from a state document) cost memory only for the records they hold."""
    return np.empty((16, width))


class OnlineHiddenMarkov:
    """Base of `OnlineGaussianHMM` and `OnlineMarkovSwitchingRegression` (not public)."""

    def _check_common(self) -> None:
        check_n_components(self.n_states)
        check_positive(self.batch_size, "batch_size", integer=True)
        check_positive(self.warmup, "warmup", integer=True)
        if self.warmup < self.n_states:
            raise ValueError(f"warmup must be at least n_states={self.n_states}, got {self.warmup}")
        if self.step is not None and not isinstance(self.step, StepSize):
            raise ValueError(f"step must be a StepSize, got {self.step!r}")

    def _reset(self) -> None:
        self._warm: dict = {}  # stream -> warm-up rows (lists), in arrival order of the streams
        self._n_warm = 0
        self._engine: BlockOnlineEM | None = None
        self._streams: dict = {}
        self.n_seen = 0
        # (rows, parameters, log-densities) of the last `outlier_distances`: the Kafka consumer screens
        # a poll's rows of a sequence, then filters the same rows, which reuse them (one family E-step)
        self._scored: tuple | None = None

    # -- what a subclass provides -----------------------------------------------------------------
    def _prepare(self, rows: np.ndarray, shift):  # pragma: no cover - abstract
        raise NotImplementedError

    def _warm_up_fit(self, rows: np.ndarray, lengths: list[int]):  # pragma: no cover - abstract
        """A batch model fitted to the warm-up sequences: (HMMParams, HMMStats summed over them,
        the filtered probabilities (n, K) under the fitted parameters)."""
        raise NotImplementedError

    def _emission_document(self, emissions) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _emission_params(self, document: dict, width: int):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- state of the model -------------------------------------------------------------------------
    @property
    def is_warm(self) -> bool:
        return self._engine is not None

    @property
    def warmup_needed(self) -> int:
        """Records the warm-up still needs (0 once warm)."""
        return 0 if self._engine is not None else self.warmup - self._n_warm

    @property
    def startprob_(self):
        return None if self._engine is None else self._engine.params.chain.startprob

    @property
    def transmat_(self):
        return None if self._engine is None else self._engine.params.chain.transmat

    @property
    def statistics_(self) -> HMMStats | None:
        """The running statistics, normalised per record (None before the warm-up)."""
        return None if self._engine is None else self._engine.stats

    @property
    def streams_(self) -> list:
        """The streams the model follows (River's single stream is None)."""
        return list(self._streams) if self._engine is not None else list(self._warm)

    def stream_filter(self, stream=None) -> np.ndarray | None:
        """P(state | every record of `stream` learned so far), (K,) (None before the warm-up or the
        stream's first record)."""
        if self._engine is None or stream not in self._streams:
            return None
        return self._latest(self._streams[stream])

    def forget_stream(self, stream) -> None:
        """Drop a stream's filter and open block (its records stay learned up to its last block)."""
        self._streams.pop(stream, None)
        rows = self._warm.pop(stream, None)
        if rows is not None:
            self._n_warm -= len(rows)

    # -- learning -------------------------------------------------------------------------------------
    def filter_and_learn(self, rows: np.ndarray, stream=None) -> tuple[np.ndarray, np.ndarray]:
        """Answer and learn consecutive validated rows of `stream`: (filtered probabilities (n, K),
        log p(row | the stream before it) (n,)), each row answered as `predict_proba_one` would
        have answered it just before learning it. During the warm-up the answers are uniform and
        the log-likelihoods NaN (there is no model yet)."""
        return self._take(rows, stream, answer=True)

    def filter_and_summarize(self, rows: np.ndarray, stream=None) -> tuple[np.ndarray, np.ndarray, list[HMMStats]]:
        """As `filter_and_learn`, but the parameters stay as they are: each block of `batch_size` rows
        that completes is summarised from the stream's filter before it (as `summarize` would) and its
        `HMMStats` handed back, in order, for the caller to `apply` when it chooses (a replicated model
        applies every copy's blocks in one log's order). The stream's filter goes on through the
        answers given. The warm-up is `filter_and_learn`'s; rows after it count in `n_seen` when
        their statistics are applied."""
        blocks: list[HMMStats] = []
        filtered, log_likelihood = self._take(rows, stream, answer=True, blocks=blocks)
        return filtered, log_likelihood, blocks

    def filter_known(self, rows: np.ndarray, stream=None) -> tuple[np.ndarray, np.ndarray]:
        """Answer validated rows of `stream` the model has learned already (through another copy of it,
        say, before a restart) as `filter_and_learn` would, and move the stream's filter through them,
        learning nothing: the stream's open block, whose rows came before them, is dropped. Before the
        warm-up the answers are uniform and nothing changes."""
        self._check_rows(rows)
        _check_stream(stream)
        n, K = rows.shape[0], self.n_states
        if self._engine is None or n == 0:
            return np.full((n, K), 1.0 / K), np.full(n, np.nan)
        current = self._streams.get(stream)
        filtered, log_likelihood = self._filtered(rows, None if current is None else self._latest(current))
        self._streams[stream] = Stream(filtered[-1].copy(), _buffer(rows.shape[1]))
        return filtered, log_likelihood

    def stream_state(self, stream=None) -> dict | None:
        """A stream's filter and open block as JSON (the entry `to_dict` holds), for a copy of the model to
        go on from (`restore_stream`); None before the warm-up or if the model does not follow it."""
        current = self._streams.get(stream) if self._engine is not None else None
        return None if current is None else self._stream_entry(current)

    def _stream_entry(self, stream: Stream) -> dict:
        """A stream's filter before its open block, the block's rows, and the filter through them (as
        answered: the parameters may have moved since, with another stream's block)."""
        return {
            "filter": None if stream.before is None else stream.before.tolist(),
            "block": stream.block().tolist(),
            "latest": None if stream.count == 0 else self._latest(stream).tolist(),
        }

    def restore_stream(self, stream, state: dict) -> None:
        """Follow `stream` from `stream_state` output (of this model or a copy of it), in place of what the
        model had of it; a state that does not fit raises StateError and changes nothing."""
        _check_stream(stream)
        if self._engine is None:
            raise StateError(f"the {type(self).__name__} cannot follow a stream before its warm-up")
        if not isinstance(state, dict):
            raise StateError(f"a stream state must be a dict with 'filter' and 'block', got {type(state).__name__}")
        width = self._row_width(len(self._feature_list()))
        try:
            self._streams[stream] = self._stream_of({"stream": stream, **state}, width)
        except KeyError as error:
            raise StateError(f"a stream state must have the field {error}") from None
        except (TypeError, ValueError) as error:
            raise StateError(f"stream state is invalid: {error}") from None

    def learn_rows(self, rows: np.ndarray, stream=None) -> None:
        """Learn consecutive validated rows of `stream` without answering them: the same model as
        `filter_and_learn`, faster (the filter is brought up to date when it is next asked for)."""
        self._take(rows, stream, answer=False)

    def _take(self, rows: np.ndarray, stream, answer: bool, forecast: bool = False, blocks: list | None = None):
        """Learn rows of `stream`; with `answer`, (filtered (n, K), log-likelihoods (n,)) of each row
        before it was learned, and with `forecast` the subclass's forecast of each row too. With
        `blocks`, completed blocks are summarised into it instead of learned (`filter_and_summarize`)."""
        self._check_rows(rows)
        _check_stream(stream)
        saved = self._saved(stream)
        try:
            return self._take_checked(rows, stream, answer, forecast, blocks)
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as error:
            self._put_back(saved)  # all or nothing: a failed call learns none of its rows
            if isinstance(error, ValueError):
                raise
            raise ValueError(f"the model could not learn these rows ({error}); none was learned") from error

    def _check_rows(self, rows: np.ndarray) -> None:
        """Rows of the model's width holding finite numbers below `TOO_LARGE`, else ValueError."""
        n = rows.shape[0]
        names = self._feature_list()
        if names is None:
            raise ValueError(f"the {type(self).__name__} does not know its features yet: give features=...")
        if not names:
            raise ValueError("a record must hold at least one feature")
        if rows.ndim != 2 or rows.shape[1] != self._row_width(len(names)):
            raise ValueError(f"rows must have shape (n, {self._row_width(len(names))}) for features {names}, "
                             f"got {rows.shape}")
        if n == 1:  # learn_one's path: a few floats in Python beat two NumPy reductions (~7 us)
            fine = all(-TOO_LARGE < value < TOO_LARGE for value in rows[0].tolist())  # NaN fails both
        else:
            fine = n == 0 or (rows.max() < TOO_LARGE and rows.min() > -TOO_LARGE)
        if not fine:
            i, j = np.argwhere(~(np.abs(rows) < TOO_LARGE))[0]
            value, name = rows[i, j], self._column_name(names, j)
            if not np.isfinite(value):
                raise ValueError(f"row {i}: {name} is {value}; values must be finite numbers")
            raise ValueError(f"row {i}: {name} is {value:.3g}, too large for the model's statistics "
                             f"(|x| >= {TOO_LARGE:.0e})")

    # -- statistics: the interface every model shares ------------------------------------------------
    def summarize(self, rows: np.ndarray, stream=None) -> Summary:
        """One E-step over validated rows as the next records of `stream`, changing nothing:
        (posteriors (n, K), smoothed over the rows from the stream's filter before them; log p(row |
        the stream before it) (n,); their `HMMStats`, sums over the rows, the transition into the
        first row counted). `model.apply(model.summarize(rows, s).statistics)` at the start of a
        block learns what `filter_and_learn(rows, s)` learns from a block of those rows (a filter
        aside: `apply` does not move the stream's). The model must be warm."""
        self._check_rows(rows)
        _check_stream(stream)
        if not rows.shape[0]:
            raise ValueError("summarize needs at least one row")
        if self._engine is None:
            raise ValueError(f"the {type(self).__name__} has no parameters before its warm-up "
                             f"({self._n_warm} of {self.warmup} records)")
        current = self._streams.get(stream)
        before = None if current is None else self._latest(current)
        params = self._engine.params
        batch = self._prepare(rows, self._engine.stats.emissions.shift)
        result, statistics = block_statistics(self._family, batch, params, before)
        return Summary(result.posterior, result.log_likelihood, statistics)

    def apply(self, statistics: HMMStats) -> None:
        """Blend statistics (sums over their records, as `summarize` gives them) into the running ones
        with the step of the next update, and run the M-step: one block-online update. Statistics of
        the wrong type, shape or values raise ValueError and change nothing. The model must be warm."""
        engine = self._engine
        if engine is None:
            raise ValueError(f"the {type(self).__name__} has no statistics to blend into before its warm-up "
                             f"({self._n_warm} of {self.warmup} records)")
        check_hmm_statistics(statistics, type(self).__name__, type(engine.stats.emissions), engine.stats.shapes)
        saved = (engine.stats, engine.params, engine.n_updates)
        try:
            engine.apply(statistics)
        except (ArithmeticError, np.linalg.LinAlgError) as error:
            engine.stats, engine.params, engine.n_updates = saved
            raise ValueError(f"the model could not apply these statistics ({error}); nothing changed") from error
        self.n_seen += int(round(statistics.count))

    def _column_name(self, names: list, j: int) -> str:
        return f"feature {names[j]!r}" if j < len(names) else "the target"

    def _saved(self, stream) -> tuple:
        """What a call on `stream` may change, to put back if it fails (the engine's statistics and
        parameters are replaced, never changed in place, so references suffice)."""
        engine, current = self._engine, self._streams.get(stream)
        return (
            engine,
            None if engine is None else (engine.stats, engine.params, engine.n_updates),
            self.n_seen,
            self._n_warm,
            self._warm,
            {name: len(rows) for name, rows in self._warm.items()},
            self._streams,
            stream,
            # the buffer itself, not a copy: rows are only ever written past `count`, and a learned block
            # leaves its buffer behind (`_update`), so the rows before `count` stay as they were
            None if current is None else (current, current.before, current.count, current.latest, current.rows),
        )

    def _put_back(self, saved: tuple) -> None:
        engine, engine_state, self.n_seen, self._n_warm, warm, lengths, streams, name, current = saved
        self._engine, self._warm, self._streams = engine, warm, streams
        if engine is not None:
            engine.stats, engine.params, engine.n_updates = engine_state
        for key in list(warm):  # the warm-up's rows as they were (a warm-up that failed took them all)
            if key in lengths:
                del warm[key][lengths[key] :]
            else:
                del warm[key]
        if current is None:
            streams.pop(name, None)  # a stream this call started
        else:
            stream, stream.before, stream.count, stream.latest, stream.rows = current
            streams[name] = stream

    def _take_checked(self, rows: np.ndarray, stream, answer: bool, forecast: bool, blocks: list | None):
        n, K = rows.shape[0], self.n_states
        filtered = log_likelihood = forecasts = None
        if answer:
            filtered, log_likelihood = np.full((n, K), 1.0 / K), np.full(n, np.nan)
        if forecast:
            forecasts = np.empty(n)
        at = 0
        if self._engine is None:
            at = min(n, self.warmup - self._n_warm)
            if forecast:
                forecasts[:at] = self._cold_forecasts(rows[:at])
            self._warm.setdefault(stream, []).extend(rows[:at].tolist())
            self._n_warm += at
            self.n_seen += at
            if self._n_warm < self.warmup:
                return (filtered, log_likelihood, forecasts) if forecast else (filtered, log_likelihood)
            self._warm_up()
        size = self.batch_size
        while at < n:
            current = self._streams.get(stream)
            if current is None:
                current = self._streams[stream] = Stream(None, _buffer(rows.shape[1]))
            take = min(n - at, size - current.count)
            segment = rows[at : at + take]
            if answer:
                before = self._latest(current)
                answers, densities = self._filtered(segment, before)
                filtered[at : at + take], log_likelihood[at : at + take] = answers, densities
                if forecast:
                    chain = self._engine.params.chain
                    predicted = np.empty_like(answers)  # P(state of each row | the rows before it)
                    predicted[0] = chain.startprob if before is None else before @ chain.transmat
                    predicted[1:] = answers[:-1] @ chain.transmat
                    forecasts[at : at + take] = self._forecasts(segment, predicted)
            current.extend(segment)
            if answer:
                current.latest = (current.count, answers[-1])
            at += take
            if blocks is None:
                self.n_seen += take
            if current.count == size:
                if blocks is None:
                    self._update(current)
                else:
                    blocks.append(self._summarized(current))
        return (filtered, log_likelihood, forecasts) if forecast else (filtered, log_likelihood)

    def outlier_distances(self, rows: np.ndarray) -> np.ndarray:
        """How far each validated row is from the model, (n,): its squared Mahalanobis distance to the
        closest state under the current parameters (for a regression, the target's squared residual in
        noise variances); before the warm-up, the squared distance from the warm-up records' median in
        robust sds (1.4826 MAD, over the features with a spread); while fewer than 20 are buffered, from
        the buffered records and these rows together (a median one absurd record cannot move, so a fresh
        model's first records are judged too), 0 while they make fewer than 20. Nothing changes; the
        Kafka consumer dead-letters rows beyond its --outlier-threshold."""
        if self._engine is None:
            warm = [row for block in self._warm.values() for row in block]
            if len(warm) + (rows.shape[0] if len(warm) < 20 else 0) < 20:
                return np.zeros(rows.shape[0])
            buffered = np.asarray(warm, dtype=float).reshape(len(warm), rows.shape[1])
            if len(warm) < 20:
                buffered = np.vstack([buffered, rows])
            median = np.median(buffered, axis=0)
            spread = 1.4826 * np.median(np.abs(buffered - median), axis=0)
            spread = np.where(spread > 0, spread, np.inf)  # a constant column says nothing about distance
            return (((rows - median) / spread) ** 2).sum(axis=1)
        params = self._engine.params
        batch = self._prepare(rows, self._engine.stats.emissions.shift)
        log_b = self._family.log_prob(batch, params.emissions)
        self._scored = (rows.copy(), params, log_b)
        return self._squared_distances(log_b, params.emissions).min(axis=1)

    def _squared_distances(self, log_b: np.ndarray, emissions) -> np.ndarray:  # pragma: no cover - abstract
        """Each row's squared distance to each state (n, K), from its log-densities."""
        raise NotImplementedError

    def _forecasts(self, rows: np.ndarray, predicted: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """A regression's forecast of each row's target from its features and `predicted` (n, K)."""
        raise NotImplementedError

    def _cold_forecasts(self, rows: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """The forecasts of rows taken into the warm-up (no model yet)."""
        raise NotImplementedError

    def _warm_up(self) -> None:
        streams = list(self._warm.items())
        rows = np.array([row for _, block in streams for row in block], dtype=float)
        lengths = [len(block) for _, block in streams]
        params, stats, filtered = self._warm_up_fit(rows, lengths)
        self._engine = BlockOnlineEM(
            family=self._family,
            stats=stats.scaled(1.0 / len(rows)),
            params=params,
            n_updates=len(rows) / self.batch_size,
            schedule=self.step or StepSize(),
            keep_states=self.keep_states,
        )
        ends = np.cumsum(lengths)
        self._streams = {
            name: Stream(filtered[end - 1].copy(), _buffer(rows.shape[1]))
            for (name, _), end in zip(streams, ends, strict=True)
        }
        self._warm, self._n_warm = {}, 0

    def _update(self, stream: Stream) -> None:
        engine = self._engine
        batch = self._prepare(stream.block(), engine.stats.emissions.shift)
        result, block = block_statistics(self._family, batch, engine.params, stream.before)
        engine.apply(block)
        stream.before = result.filtered[-1].copy()
        stream.count, stream.latest = 0, None
        stream.rows = _buffer(stream.rows.shape[1])  # a new buffer: a call that fails later puts this one back

    def _summarized(self, stream: Stream) -> HMMStats:
        """The statistics of a stream's completed block, not applied; the stream goes on from the filter
        it answered the block's last row with."""
        engine = self._engine
        batch = self._prepare(stream.block(), engine.stats.emissions.shift)
        statistics = block_statistics(self._family, batch, engine.params, stream.before)[1]
        stream.before = stream.latest[1]
        stream.count, stream.latest = 0, None
        stream.rows = _buffer(stream.rows.shape[1])  # a new buffer: a call that fails later puts this one back
        return statistics

    # -- the filter -------------------------------------------------------------------------------
    def _latest(self, stream: Stream) -> np.ndarray | None:
        """The filter through the stream's block (computed when asked, for the rows learned since)."""
        if stream.count == 0:
            return stream.before
        done, filtered = stream.latest if stream.latest is not None else (0, stream.before)
        if done < stream.count:
            filtered = self._filtered(stream.rows[done : stream.count], filtered)[0][-1]
            stream.latest = (stream.count, filtered)
        return filtered

    def _filtered(self, rows: np.ndarray, before: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Filtered probabilities (n, K) and log p(x_t | past) (n,) of `rows` following the filter `before`."""
        params = self._engine.params
        chain = params.chain
        predicted = chain.startprob if before is None else before @ chain.transmat
        scored = self._scored  # the same rows just screened under these parameters (never replaced in place)
        if (scored is not None and scored[1] is params and scored[0].shape == rows.shape
                and np.array_equal(scored[0], rows)):
            log_b = scored[2]
        else:
            batch = self._prepare(rows, self._engine.stats.emissions.shift)
            log_b = self._family.log_prob(batch, params.emissions)
        return filter_states(log_b, predicted, chain.transmat, *one_sequence(rows.shape[0]))

    def _next(self, row: list, stream=None) -> tuple[np.ndarray, float] | None:
        """(P(state of row | stream so far and row), log p(row | stream so far)); None before the warm-up."""
        if self._engine is None:
            return None
        current = self._streams.get(stream)
        before = None if current is None else self._latest(current)
        filtered, log_likelihood = self._filtered(np.array([row], dtype=float), before)
        return filtered[0], float(log_likelihood[0])

    # -- state as JSON ------------------------------------------------------------------------------
    def _params_document(self) -> dict:
        import inspect

        names = [name for name in inspect.signature(type(self).__init__).parameters if name != "self"]
        params = {name: getattr(self, name) for name in names}
        params["step"] = None if self.step is None else self.step.to_dict()
        for name, value in params.items():
            if isinstance(value, tuple):
                params[name] = list(value)
        return params

    def to_dict(self) -> dict:
        """The whole state as a JSON-ready dict: parameters, running statistics, and every stream's
        filter and open block (restore it and go on: the answers equal never stopping)."""
        engine = self._engine
        return {
            "format": f"streamem.{type(self).__name__}",
            "version": FORMAT_VERSION,
            "params": self._params_document(),
            "features": self._feature_list(),
            "n_seen": self.n_seen,
            "warm_up": [{"stream": name, "rows": rows} for name, rows in self._warm.items()],
            "streams": [{"stream": name, **self._stream_entry(s)} for name, s in self._streams.items()],
            "engine": None
            if engine is None
            else {
                "n_updates": engine.n_updates,
                "stats": engine.stats.to_dict(),
                "startprob": engine.params.chain.startprob.tolist(),
                "transmat": engine.params.chain.transmat.tolist(),
                **self._emission_document(engine.params.emissions),
            },
        }

    @classmethod
    def from_dict(cls, document):
        """Rebuild a model from `to_dict()` output (or its JSON text); `StateError` names what is wrong."""
        document = json_object(document, "model state")
        expected = f"streamem.{cls.__name__}"
        if document.get("format") != expected:
            raise StateError(f"model state format is {document.get('format')!r}, expected {expected!r}")
        if document.get("version") != FORMAT_VERSION:
            raise StateError(f"model state version {document.get('version')!r} is not {FORMAT_VERSION}")
        try:
            params = dict(document["params"])
            if params.get("step") is not None:
                params["step"] = StepSize(**params["step"])
            if params.get("features") is not None:
                params["features"] = tuple(params["features"])
            model = cls(**params)
            model._restore(document)
        except StateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise StateError(f"model state is invalid: {error}") from None
        except OverflowError as error:  # a number beyond a float, e.g. 1e400 in the JSON text
            raise StateError(f"model state holds a number out of range: {error}") from None
        return model

    def _restore(self, document: dict) -> None:
        names = document["features"]
        self._set_features(names)
        width = None if names is None else self._row_width(len(names))
        n_seen = document["n_seen"]
        if isinstance(n_seen, bool) or not isinstance(n_seen, int) or n_seen < 0:
            raise StateError(f"model state n_seen must be an integer >= 0, got {n_seen!r}")
        self.n_seen = n_seen
        warm = {
            _stream_name(entry["stream"], warm_names): _rows(entry["rows"], width, "warm_up")
            for warm_names in [set()]
            for entry in document["warm_up"]
        }
        engine = document["engine"]
        if engine is None:
            if document["streams"] or sum(map(len, warm.values())) >= self.warmup:
                raise StateError("model state has streams but no parameters")
            self._warm, self._n_warm = warm, sum(map(len, warm.values()))
            return
        if warm or width is None:
            raise StateError("model state is warm but holds warm-up records, or has no features")
        K = self.n_states
        stats = HMMStats.from_dict(engine["stats"])
        expected = self._family.suff_stats(self._prepare(np.zeros((1, width)), None), np.full((1, K), 1.0 / K))
        if stats.first.shape != (K,) or stats.emissions.shapes != expected.shapes:
            raise StateError(f"model state statistics have shapes {stats.shapes}, expected {K} states of "
                             f"{expected.shapes}")
        # running statistics are per record: a record's worth of mass, at most one start and one move a record
        with np.errstate(over="ignore"):  # huge counts sum to inf, which the check refuses
            count, starts, moves = stats.count, float(stats.first.sum()), float(stats.transitions.sum())
        if not (math.isclose(count, 1.0, rel_tol=1e-6) and starts <= 1.0 + 1e-6 and moves <= 1.0 + 1e-6):
            raise StateError(f"model state statistics must be per record (count 1, at most one start and one "
                             f"transition a record), got count {count:.6g}, starts {starts:.6g}, "
                             f"transitions {moves:.6g}")
        chain = checked_chain(engine["startprob"], engine["transmat"], K)
        emissions = self._emission_params(engine, width)
        n_updates = float(engine["n_updates"])
        if not math.isfinite(n_updates) or n_updates < 0:
            raise StateError(f"model state n_updates must be a finite number >= 0, got {n_updates}")
        self._engine = BlockOnlineEM(
            self._family, stats, HMMParams(chain, emissions), n_updates, self.step or StepSize(), self.keep_states
        )
        self._streams = {}
        names_seen: set = set()
        for entry in document["streams"]:
            _stream_name(entry["stream"], names_seen)
            self._streams[entry["stream"]] = self._stream_of(entry, width)

    def _stream_of(self, entry: dict, width: int) -> Stream:
        """A stream from its state document entry ({stream, filter, block}), checked."""
        K = self.n_states
        block = _rows(entry["block"], width, "block")
        if len(block) >= self.batch_size:
            raise StateError(f"model state stream {entry['stream']!r} holds a full block")
        before, latest = (self._probabilities(entry, name, K) for name in ("filter", "latest"))
        stream = Stream(before, _buffer(width))
        if block:  # a block just learned leaves none open
            stream.extend(np.asarray(block, dtype=float))
            if latest is not None:  # (written before the filter through the block was kept: computed again)
                stream.latest = (stream.count, latest)
        return stream

    @staticmethod
    def _probabilities(entry: dict, name: str, K: int) -> np.ndarray | None:
        """A filter of a stream's state document entry: None, or K probabilities summing to 1."""
        value = entry.get(name) if name == "latest" else entry[name]
        if value is None:
            return None
        probabilities = np.asarray(value, dtype=float)
        if probabilities.shape != (K,) or not np.all(probabilities >= 0) or not math.isclose(
            probabilities.sum(), 1.0, rel_tol=1e-9
        ):
            raise StateError(f"model state {name} of stream {entry['stream']!r} must be {K} probabilities "
                             "summing to 1")
        return probabilities


def _rows(value, width: int | None, name: str) -> list[list[float]]:
    if not isinstance(value, list):
        raise StateError(f"model state {name} must be a list of records")
    if value and width is None:
        raise StateError(f"model state has {name} records but no feature names")
    if not value:
        return []
    rows = check_array(value, name=f"model state {name}", n_features=width)
    if not np.abs(rows).max() < TOO_LARGE:
        raise StateError(f"model state {name} holds a value too large for the model's statistics")
    return rows.tolist()


def _stream_name(name, seen: set):
    """A stream's name from a state document: a str, an int or None, each once."""
    if name is not None and not isinstance(name, (str, int)) or isinstance(name, bool):
        raise StateError(f"model state stream names are str, int or null, got {name!r}")
    if name in seen:
        raise StateError(f"model state lists stream {name!r} twice")
    seen.add(name)
    return name
