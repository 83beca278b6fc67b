"""Online Gaussian hidden Markov model: block-online EM as a River clusterer, with a filter that
follows the stream."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from river import base

from streamem._online_hmm import OnlineHiddenMarkov
from streamem._validation import check_array, check_choice, check_positive, record_values
from streamem.engines.baum_welch import HMMParams
from streamem.exceptions import ConvergenceWarning
from streamem.families.gaussian import COVARIANCE_TYPES, GaussianFamily
from streamem.families.markov import ChainParams
from streamem.gaussian_hmm import GaussianHMM, keep_gaussian_states
from streamem.outliers import TOO_LARGE
from streamem.schedules import StepSize

__all__ = ["OnlineGaussianHMM"]


class OnlineGaussianHMM(OnlineHiddenMarkov, base.Clusterer):
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

    keep_states = staticmethod(keep_gaussian_states)

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
        self._check_common()
        check_choice(covariance_type, "covariance_type", COVARIANCE_TYPES)
        if features is not None and (isinstance(features, str) or not len(features)):
            raise ValueError(f"features must be a non-empty sequence of feature names, got {features!r}")
        check_positive(reg_covar, "reg_covar", allow_zero=True)
        self._reset()

    @classmethod
    def _unit_test_params(cls):
        yield {"n_states": 2, "warmup": 20, "batch_size": 8, "seed": 42}
        yield {"n_states": 3, "covariance_type": "diag", "warmup": 30, "batch_size": 5, "seed": 1}

    def _reset(self) -> None:
        super()._reset()
        self._family = GaussianFamily(self.covariance_type, self.reg_covar)
        self._names = tuple(self.features) if self.features is not None else None

    # -- hooks of the online base --------------------------------------------------------------
    def _prepare(self, rows: np.ndarray, shift):
        return self._family.prepare(rows, shift)

    def _warm_up_fit(self, rows: np.ndarray, lengths: list[int]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a warm-up is a start, refined online
            fit = GaussianHMM(
                self.n_states, self.covariance_type, reg_covar=self.reg_covar, random_state=self.seed
            ).fit(rows, lengths)
        uniform = np.full(self.n_states, 1.0 / self.n_states)
        params = HMMParams(
            ChainParams(fit.startprob_, fit.transmat_), self._family.make_params(uniform, fit.means_, fit.covariances_)
        )
        return params, fit.summarize(rows, lengths).statistics, fit.filter_proba(rows, lengths)

    def _squared_distances(self, log_b: np.ndarray, emissions) -> np.ndarray:
        # log N(x | k) = log_det_precision_k - d/2 log(2 pi) - m_k^2 / 2
        d = emissions.means.shape[1]
        return np.maximum(2.0 * (emissions.log_det_precision - 0.5 * d * math.log(2 * math.pi) - log_b), 0.0)

    def _emission_document(self, emissions) -> dict:
        return {"means": emissions.means.tolist(), "covariances": emissions.covariances.tolist()}

    def _emission_params(self, document: dict, width: int):
        K = self.n_states
        emissions = self._family.make_params(np.full(K, 1.0 / K), document["means"], document["covariances"])
        if not np.all(np.abs(emissions.means) < TOO_LARGE):
            raise ValueError("means must be finite numbers")
        if emissions.means.shape != (K, width):
            raise ValueError(f"means have shape {emissions.means.shape}, expected {(K, width)}")
        return emissions

    def _feature_list(self) -> list | None:
        return None if self._names is None else list(self._names)

    def _set_features(self, names) -> None:
        self._names = None if names is None else tuple(names)

    @staticmethod
    def _row_width(d: int) -> int:
        return d

    # -- parameters ---------------------------------------------------------------------------
    @property
    def features_(self) -> tuple | None:
        return self._names

    @property
    def means_(self):
        return None if self._engine is None else self._engine.params.emissions.means

    @property
    def covariances_(self):
        return None if self._engine is None else self._engine.params.emissions.covariances

    @property
    def filter_(self) -> np.ndarray | None:
        """P(state | every record learned so far), (K,) (None before the warm-up)."""
        return self.stream_filter(None)

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

    # -- River API ----------------------------------------------------------------------------
    def learn_one(self, x: dict) -> None:
        """Learn from one record: the filter moves on to it (the parameters update every `batch_size`)."""
        names = self._names_for(x)
        row = record_values(x, names)
        self._learn_as(names, np.array([row], dtype=float))

    def learn_many(self, X) -> None:
        """Learn from a DataFrame (or an array, once the features are known) of consecutive records,
        vectorised; the same model as a `learn_one` loop over its rows."""
        rows, names = self._frame_rows(X)
        self._learn_as(names, rows)

    def _learn_as(self, names: tuple, rows: np.ndarray) -> None:
        """Learn rows of features `names` (the first record's keys name the features, once it is learned)."""
        if not names:
            raise ValueError("a record must hold at least one feature")
        known, self._names = self._names, names
        try:
            self.learn_rows(rows)
        except (ValueError, TypeError):
            self._names = known
            raise

    def _answer(self, x) -> tuple[np.ndarray, float]:
        row = record_values(x, self._names_for(x))
        answer = self._next(row)
        if answer is None:  # nothing learned yet: every state alike, a standard normal density
            K = self.n_states
            return np.full(K, 1.0 / K), float(-0.5 * sum(v * v + math.log(2 * math.pi) for v in row))
        return answer

    def predict_one(self, x: dict) -> int:
        """The most likely state of `x` as the stream's next record (nothing is learned)."""
        return int(np.argmax(self._answer(x)[0]))

    def predict_proba_one(self, x: dict) -> dict[int, float]:
        """P(state k | the stream so far and x) for `x` as the next record: {k: p}."""
        return dict(enumerate(self._answer(x)[0].tolist()))

    def score_one(self, x: dict) -> float:
        """log p(x | the records learned so far): the one-step predictive log-density."""
        return self._answer(x)[1]
