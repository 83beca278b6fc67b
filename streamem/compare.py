"""Consistency of an online model with the batch reference: match components, measure gaps."""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment

from streamem._validation import check_array, check_target
from streamem.families.gaussian import GaussianFamily, GaussianParams, full_covariances
from streamem.families.regression import RegressionFamily

__all__ = ["ConsistencyReport", "compare"]


@dataclasses.dataclass(frozen=True)
class ConsistencyReport:
    """How far an online model is from a batch model, component by component.

    Attributes
    ----------
    matching
        `matching[k]` is the batch component matched to online component k
        (Hungarian assignment minimising the summed distance between means, or
        between regression coefficients).
    weight_gap
        Largest |w_online - w_batch| over matched components.
    mean_gap
        Largest Euclidean distance between matched means (regression: between
        matched [coef, intercept] vectors).
    covariance_gap
        Largest Frobenius norm of the difference of matched covariances
        (regression: largest difference of noise standard deviations).
    log_likelihood_gap
        Mean per-record log-likelihood on X under the online model minus under the
        batch model (negative: the online model fits X worse).
    """

    matching: tuple[int, ...]
    weight_gap: float
    mean_gap: float
    covariance_gap: float
    log_likelihood_gap: float

    def __str__(self) -> str:
        return (
            f"components matched (online -> batch): {list(self.matching)}\n"
            f"largest weight gap:        {self.weight_gap:.6f}\n"
            f"largest mean gap:          {self.mean_gap:.6f}\n"
            f"largest covariance gap:    {self.covariance_gap:.6f}\n"
            f"log-likelihood gap / rec:  {self.log_likelihood_gap:+.6f} nats"
        )


def compare(online_model, batch_model, X, y=None) -> ConsistencyReport:
    """Compare an online model with a fitted batch model of the same family on data X (and y).

    Examples
    --------
    >>> import numpy as np, pandas as pd, streamem as se
    >>> rng = np.random.default_rng(1)
    >>> X = np.r_[rng.normal(0, 1, (3000, 1)), rng.normal(8, 1, (3000, 1))]
    >>> rng.shuffle(X)
    >>> online = se.OnlineGMM(2, warmup=500, batch_size=100, seed=0)
    >>> online.learn_many(pd.DataFrame(X, columns=["x"]))
    >>> report = se.compare(online, se.GaussianMixture(2, random_state=0).fit(X), X)
    >>> report.mean_gap < 0.1 and abs(report.log_likelihood_gap) < 0.01
    True
    """
    online = online_model._params()
    batch = batch_model._params
    if online.weights.shape != batch.weights.shape:
        raise ValueError(
            f"the models have {online.weights.shape[0]} and {batch.weights.shape[0]} components; compare needs equal K"
        )
    X = check_array(X, n_features=batch_model.n_features_in_)
    if isinstance(online, GaussianParams):
        family = GaussianFamily(batch.covariance_type)
        centre = batch.weights @ batch.means
        gap = np.mean(
            family.e_step(family.prepare(X, centre), online)[0] - family.e_step(family.prepare(X, centre), batch)[0]
        )
        online_location, batch_location = online.means, batch.means
        spread = [full_covariances(online), full_covariances(batch)]
    else:
        if y is None:
            raise ValueError("comparing regression mixtures needs the targets y")
        y = check_target(y, n_samples=X.shape[0])
        family = RegressionFamily()
        prepared = family.prepare(X, y, shift=np.zeros(X.shape[1] + 1))
        gap = np.mean(family.e_step(prepared, online)[0] - family.e_step(prepared, batch)[0])
        online_location = np.c_[online.coef, online.intercept]
        batch_location = np.c_[batch.coef, batch.intercept]
        spread = [np.sqrt(online.noise_variance), np.sqrt(batch.noise_variance)]
    distances = np.linalg.norm(online_location[:, None, :] - batch_location[None, :, :], axis=2)
    rows, matched = linear_sum_assignment(distances)
    matched = matched[np.argsort(rows)]
    if spread[0].ndim == 3:
        covariance_gap = max(np.linalg.norm(spread[0][k] - spread[1][j]) for k, j in enumerate(matched))
    else:
        covariance_gap = float(np.max(np.abs(spread[0] - spread[1][matched])))
    return ConsistencyReport(
        matching=tuple(int(j) for j in matched),
        weight_gap=float(np.max(np.abs(online.weights - batch.weights[matched]))),
        mean_gap=float(np.max(distances[np.arange(len(matched)), matched])),
        covariance_gap=float(covariance_gap),
        log_likelihood_gap=float(gap),
    )
