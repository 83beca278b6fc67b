"""Warnings and errors of streamem."""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "NotFittedError", "OutlierError"]


class ConvergenceWarning(UserWarning):
    """EM stopped at `max_iter` before the log-likelihood settled within `tol`."""


class NotFittedError(ValueError, AttributeError):
    """A method that needs fitted parameters was called before `fit`."""


class OutlierError(ValueError):
    """A record the online model refuses to learn: a value too large for its statistics, or a
    squared distance beyond `outlier_threshold` (see `streamem.outliers`).

    Attributes
    ----------
    feature : the feature most to blame (None if unknown)
    value : its value
    distance : the record's squared distance (inf for a value too large)
    """

    def __init__(self, message: str, *, feature=None, value: float | None = None, distance: float = float("inf")):
        super().__init__(message)
        self.feature = feature
        self.value = value
        self.distance = distance
