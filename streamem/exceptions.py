"""Warnings and errors of streamem."""

from __future__ import annotations

__all__ = ["ConvergenceWarning", "NotFittedError"]


class ConvergenceWarning(UserWarning):
    """EM stopped at `max_iter` before the log-likelihood settled within `tol`."""


class NotFittedError(ValueError, AttributeError):
    """A method that needs fitted parameters was called before `fit`."""
