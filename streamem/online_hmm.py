"""Online Gaussian hidden Markov model: block-online EM as a River clusterer, with a filter that
follows the stream."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from river import base

from streamem._validation import check_array, check_choice, check_n_components, check_positive, record_values
from streamem.engines.baum_welch import HMMParams
from streamem.engines.block_online import BlockOnlineEM, block_statistics, one_sequence
from streamem.engines.markov_chain import filter_states
from streamem.exceptions import ConvergenceWarning
from streamem.families.gaussian import COVARIANCE_TYPES, GaussianFamily
from streamem.families.markov import ChainParams, HMMStats, checked_chain
from streamem.gaussian_hmm import GaussianHMM, keep_gaussian_states
from streamem.schedules import StepSize
from streamem.state import StateError, json_object

__all__ = ["OnlineGaussianHMM"]

FORMAT = "streamem.OnlineGaussianHMM"
FORMAT_VERSION = 1


class OnlineGaussianHMM(base.Clusterer):
    """Gaussian hidden Markov model learned online, record by record, as a River clusterer.

    The records of the stream are one sequence. The first `warmup` records are fitted by batch
    Baum-Welch (`GaussianHMM`); after that, every `batch_size` records form a block that is
    smoothed by forward-backward (continuing the filter of the block before) and blended into
    running statistics with the step-size schedule `step`, as `OnlineGMM` blends mini-batches
    (see `streamem.engines.block_online` for why blocks).

    Between updates the model keeps the **filter**, P(state | every record learned so far).
    `predict_one(x)` / `predict_proba_one(x)` answer for `x` as the stream's next record (the
    filter moved one step through `transmat_`, then weighed by x's densities) and change
    nothing, so River's predict-then-learn loop works; `learn_one(x)` then moves the filter on.

    Parameters
    ----------
    n_states
        Number of hidden states K.
    covariance_type
        ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"`` (as `GaussianMixture`).
    batch_size
        Records per block-online update.
    step
        Step-size schedule (`StepSize`); None: `StepSize()`.
    warmup
        Records fitted by batch Baum-Welch before learning online.
    features
        Feature names (default: the keys of the first record, sorted).
    reg_covar
        Added to the diagonal of every covariance after each M-step.
    seed
        Seed of the warm-up fit's k-means++ start.

    Attributes
    ----------
    startprob_ (K,), transmat_ (K, K), means_ (K, d), covariances_ : the parameters (None before
    the warm-up); filter_ (K,) P(state | records so far); n_seen : records learned.

    Examples
    --------
    >>> import numpy as np, streamem as se
    >>> rng = np.random.default_rng(0)
    >>> states = np.repeat(np.arange(40) % 2, 100)  # regimes of 100 records
    >>> values = rng.normal(np.where(states == 0, 0.0, 4.0), 1.0)
    >>> model = se.OnlineGaussianHMM(n_states=2, warmup=500, seed=0)
    >>> for value in values:
    ...     model.learn_one({"x": value})
    >>> [round(float(m)) for m in np.sort(model.means_.ravel())]
    [0, 4]
    >>> bool(np.all(np.diag(model.transmat_) > 0.95))
    True
    >>> model.predict_one({"x": 4.1}) == int(np.argmax(model.means_.ravel()))
    True
    """

    def __init__(
        self,
        n_states: int = 2,
        covariance_type: str = "full",
        batch_size: int = 128,
        step: StepSize | None = None,
        warmup: int = 500,
        features: tuple | None = None,
        reg_covar: float = 1e-6,
        seed: int | None = None,
    ):
        self.n_states = n_states
        self.covariance_type = covariance_type
        self.batch_size = batch_size
        self.step = step
        self.warmup = warmup
        self.features = features
        self.reg_covar = reg_covar
        self.seed = seed
        check_n_components(n_states)
        check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES)
        check_positive(batch_size, "batch_size", integer=True)
        check_positive(warmup, "warmup", integer=True)
        check_positive(reg_covar, "reg_covar", allow_zero=True)
        if warmup < n_states:
            raise ValueError(f"warmup must be at least n_states={n_states}, got {warmup}")
        if step is not None and not isinstance(step, StepSize):
            raise ValueError(f"step must be a StepSize, got {step!r}")
        self._reset()

    @classmethod
    def _unit_test_params(cls):
        yield {"n_states": 2, "warmup": 20, "batch_size": 8, "seed": 42}
        yield {"n_states": 3, "covariance_type": "diag", "warmup": 30, "batch_size": 5, "seed": 1}

    def _reset(self) -> None:
        self._family = GaussianFamily(self.covariance_type, self.reg_covar)
        self._names = tuple(self.features) if self.features is not None else None
        self._warm_rows: list[list[float]] = []
        self._engine: BlockOnlineEM | None = None
        self._block: list[list[float]] = []  # records learned since the last update
        self._block_filter: np.ndarray | None = None  # the filter before the block's first record
        self._filter_cache: tuple[int, np.ndarray] | None = None  # (records of the block it covers, filter)
        self.n_seen = 0

    # -- parameters ---------------------------------------------------------------------------
    @property
    def is_warm(self) -> bool:
        return self._engine is not None

    @property
    def features_(self) -> tuple | None:
        return self._names

    @property
    def startprob_(self):
        return None if self._engine is None else self._engine.params.chain.startprob

    @property
    def transmat_(self):
        return None if self._engine is None else self._engine.params.chain.transmat

    @property
    def means_(self):
        return None if self._engine is None else self._engine.params.emissions.means

    @property
    def covariances_(self):
        return None if self._engine is None else self._engine.params.emissions.covariances

    @property
    def statistics_(self) -> HMMStats | None:
        """The running statistics, normalised per record (None before the warm-up)."""
        return None if self._engine is None else self._engine.stats

    @property
    def filter_(self) -> np.ndarray | None:
        """P(state | every record learned so far), (K,) (None before the warm-up)."""
        return None if self._engine is None else self._current_filter()

    # -- records ------------------------------------------------------------------------------
    def _names_for(self, x) -> tuple:
        if self._names is not None:
            return self._names
        if not isinstance(x, dict):
            raise TypeError(f"a record must be a dict of feature name -> number, got {type(x).__name__}")
        return tuple(sorted(x, key=str))

    def _frame_rows(self, X) -> tuple[np.ndarray, tuple]:
        if isinstance(X, pd.DataFrame):
            names = self._names or tuple(sorted(X.columns, key=str))
            missing = [name for name in names if name not in X.columns]
            if missing:
                raise ValueError(f"feature {missing[0]!r} is missing from the frame")
            frame = X if tuple(X.columns) == names else X[list(names)]
            try:
                values = frame.to_numpy(dtype=float)
            except (TypeError, ValueError) as error:
                raise ValueError(f"X contains non-numeric values ({error})") from None
            return check_array(values, n_features=len(names)), names
        if self._names is None:
            raise ValueError("the OnlineGaussianHMM does not know its features yet: give features=... or a DataFrame")
        return check_array(X, n_features=len(self._names)), self._names

    # -- learning -----------------------------------------------------------------------------
    def learn_one(self, x: dict) -> None:
        """Learn from one record: the filter moves on to it (the parameters update every `batch_size`)."""
        names = self._names_for(x)
        row = record_values(x, names)
        self._names = names
        self._learn_rows(np.array([row], dtype=float))

    def learn_many(self, X) -> None:
        """Learn from a DataFrame (or an array, once the features are known) of consecutive records,
        vectorised; the same model as a `learn_one` loop over its rows."""
        rows, names = self._frame_rows(X)
        self._names = names
        self._learn_rows(rows)

    def _learn_rows(self, rows: np.ndarray) -> None:
        at = 0
        n = rows.shape[0]
        if self._engine is None:
            take = min(n, self.warmup - len(self._warm_rows))
            self._warm_rows.extend(rows[:take].tolist())
            self.n_seen += take
            at = take
            if len(self._warm_rows) < self.warmup:
                return
            self._warm_up(np.array(self._warm_rows))
        size = self.batch_size
        while at < n:
            if not self._block and n - at >= size:  # a whole block straight from the input
                self._update(rows[at : at + size])
                at += size
                self.n_seen += size
                continue
            take = min(n - at, size - len(self._block))
            self._block.extend(rows[at : at + take].tolist())
            at += take
            self.n_seen += take
            if len(self._block) == size:
                self._update(np.array(self._block))

    def _warm_up(self, rows: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a warm-up is a start, refined online
            fit = GaussianHMM(
                self.n_states, self.covariance_type, reg_covar=self.reg_covar, random_state=self.seed
            ).fit(rows)
        summary = fit.summarize(rows)
        params = HMMParams(
            ChainParams(fit.startprob_, fit.transmat_),
            self._family.make_params(np.full(self.n_states, 1.0 / self.n_states), fit.means_, fit.covariances_),
        )
        self._engine = BlockOnlineEM(
            family=self._family,
            stats=summary.statistics.scaled(1.0 / len(rows)),
            params=params,
            n_updates=len(rows) / self.batch_size,
            schedule=self.step or StepSize(),
            keep_states=keep_gaussian_states,
        )
        self._block_filter = fit.filter_proba(rows)[-1]
        self._warm_rows = []
        self._filter_cache = None

    def _update(self, rows: np.ndarray) -> None:
        engine = self._engine
        batch = self._family.prepare(rows, engine.stats.emissions.shift)
        result, block = block_statistics(self._family, batch, engine.params, self._block_filter)
        engine.apply(block)
        self._block_filter = result.filtered[-1].copy()
        self._block = []
        self._filter_cache = None

    # -- the filter ---------------------------------------------------------------------------
    def _current_filter(self) -> np.ndarray | None:
        """P(state | records learned so far): the block's records filtered from the filter before them
        (computed when asked, for the records learned since it was last asked)."""
        count = len(self._block)
        if count == 0:
            return self._block_filter
        done, filtered = self._filter_cache if self._filter_cache is not None else (0, self._block_filter)
        if done < count:
            filtered = self._filtered(np.array(self._block[done:count]), filtered)[0][-1]
            self._filter_cache = (count, filtered)
        return filtered

    def _filtered(self, rows: np.ndarray, before: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Filtered state probabilities (n, K) and log p(x_t | past) (n,) of `rows` following `before`."""
        params = self._engine.params
        chain = params.chain
        predicted = chain.startprob if before is None else before @ chain.transmat
        batch = self._family.prepare(rows, self._engine.stats.emissions.shift)
        log_b = self._family.log_prob(batch, params.emissions)
        return filter_states(log_b, predicted, chain.transmat, *one_sequence(rows.shape[0]))

    def _next(self, x) -> tuple[np.ndarray, float]:
        """(P(state of x | past and x), log p(x | past)) for `x` as the next record; changes nothing."""
        names = self._names_for(x)
        row = record_values(x, names)
        if self._engine is None:  # nothing learned yet: every state alike, a standard normal density
            K = self.n_states
            return np.full(K, 1.0 / K), float(-0.5 * sum(v * v + math.log(2 * math.pi) for v in row))
        filtered, log_likelihood = self._filtered(np.array([row], dtype=float), self._current_filter())
        return filtered[0], float(log_likelihood[0])

    # -- River API ----------------------------------------------------------------------------
    def predict_one(self, x: dict) -> int:
        """The most likely state of `x` as the stream's next record (nothing is learned)."""
        return int(np.argmax(self._next(x)[0]))

    def predict_proba_one(self, x: dict) -> dict[int, float]:
        """P(state k | the stream so far and x) for `x` as the next record: {k: p}."""
        return dict(enumerate(self._next(x)[0].tolist()))

    def score_one(self, x: dict) -> float:
        """log p(x | the records learned so far): the one-step predictive log-density."""
        return self._next(x)[1]

    # -- state --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The whole state as a JSON-ready dict: parameters, running statistics, the filter and the
        records of the current block (restore it and go on: the answers equal never stopping)."""
        engine = self._engine
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "params": {
                "n_states": self.n_states,
                "covariance_type": self.covariance_type,
                "batch_size": self.batch_size,
                "step": None if self.step is None else self.step._get_params(),
                "warmup": self.warmup,
                "features": None if self.features is None else list(self.features),
                "reg_covar": self.reg_covar,
                "seed": self.seed,
            },
            "features": None if self._names is None else list(self._names),
            "n_seen": self.n_seen,
            "warm_up": self._warm_rows,
            "block": self._block,
            "filter": None if self._block_filter is None else self._block_filter.tolist(),
            "engine": None
            if engine is None
            else {
                "n_updates": engine.n_updates,
                "stats": engine.stats.to_dict(),
                "startprob": engine.params.chain.startprob.tolist(),
                "transmat": engine.params.chain.transmat.tolist(),
                "means": engine.params.emissions.means.tolist(),
                "covariances": engine.params.emissions.covariances.tolist(),
            },
        }

    @classmethod
    def from_dict(cls, document) -> OnlineGaussianHMM:
        """Rebuild a model from `to_dict()` output (or its JSON text); `StateError` names what is wrong."""
        document = json_object(document, "model state")
        if document.get("format") != FORMAT:
            raise StateError(f"model state format is {document.get('format')!r}, expected {FORMAT!r}")
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
        except (KeyError, TypeError, ValueError) as error:
            raise StateError(f"model state is invalid: {error}") from None
        return model

    def _restore(self, document: dict) -> None:
        names = document["features"]
        self._names = None if names is None else tuple(names)
        width = None if names is None else len(names)
        self.n_seen = int(document["n_seen"])
        warm_up = _rows(document["warm_up"], width, "warm_up")
        block = _rows(document["block"], width, "block")
        engine = document["engine"]
        if engine is None:
            if block or document["filter"] is not None or len(warm_up) >= self.warmup:
                raise StateError("model state has a block or a filter but no parameters")
            self._warm_rows = warm_up
            return
        if warm_up or len(block) >= self.batch_size or width is None:
            raise StateError("model state is warm but holds warm-up records, a full block, or no features")
        K = self.n_states
        stats = HMMStats.from_dict(engine["stats"])
        expected = GaussianFamily(self.covariance_type).suff_stats(
            self._family.prepare(np.zeros((1, width))), np.full((1, K), 1.0 / K)
        ).shapes
        if stats.first.shape != (K,) or stats.emissions.shapes != expected:
            raise StateError(f"model state statistics have shapes {stats.shapes}, expected {K} states of {expected}")
        chain = checked_chain(engine["startprob"], engine["transmat"], K)
        emissions = self._family.make_params(np.full(K, 1.0 / K), engine["means"], engine["covariances"])
        if emissions.means.shape != (K, width):
            raise StateError(f"model state means have shape {emissions.means.shape}, expected {(K, width)}")
        filtered = np.asarray(document["filter"], dtype=float)
        if filtered.shape != (K,) or not np.all(filtered >= 0) or not math.isclose(filtered.sum(), 1.0, rel_tol=1e-9):
            raise StateError(f"model state filter must be {K} probabilities summing to 1")
        n_updates = float(engine["n_updates"])
        if not math.isfinite(n_updates) or n_updates < 0:
            raise StateError(f"model state n_updates must be a finite number >= 0, got {n_updates}")
        self._engine = BlockOnlineEM(
            self._family, stats, HMMParams(chain, emissions), n_updates, self.step or StepSize(), keep_gaussian_states
        )
        self._block_filter = filtered
        self._block = block


def _rows(value, width: int | None, name: str) -> list[list[float]]:
    if not isinstance(value, list):
        raise StateError(f"model state {name} must be a list of records")
    if value and width is None:
        raise StateError(f"model state has {name} records but no feature names")
    if not value:
        return []
    array = check_array(value, name=f"model state {name}", n_features=width)
    return array.tolist()
