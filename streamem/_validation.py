"""Input checks shared by every estimator: arrays in, precise errors out."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_array", "check_target", "check_n_components", "check_positive", "check_choice"]


def check_array(X, *, name: str = "X", n_features: int | None = None, min_samples: int = 1) -> np.ndarray:
    """Return `X` as a finite float64 array of shape (n_samples, n_features).

    Raises a `ValueError` naming the problem: empty input, wrong number of
    dimensions or features, non-numeric entries, NaN or infinite values (with the
    position of the first one).
    """
    try:
        array = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} contains non-numeric values ({error})") from None
    if array.ndim == 1:
        raise ValueError(
            f"{name} must be 2-D of shape (n_samples, n_features), got a 1-D array of "
            f"length {array.shape[0]}; reshape it with {name}.reshape(-1, 1) for a single feature"
        )
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D of shape (n_samples, n_features), got {array.ndim}-D")
    if array.shape[0] < min_samples:
        raise ValueError(f"{name} has {array.shape[0]} samples; at least {min_samples} required")
    if array.shape[1] == 0:
        raise ValueError(f"{name} has 0 features")
    if n_features is not None and array.shape[1] != n_features:
        raise ValueError(f"{name} has {array.shape[1]} features, but the model was fitted with {n_features}")
    _check_finite(array, name)
    return np.ascontiguousarray(array)


def check_target(y, *, n_samples: int, name: str = "y") -> np.ndarray:
    """Return `y` as a finite float64 vector of length `n_samples`."""
    try:
        target = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} contains non-numeric values ({error})") from None
    if target.ndim == 2 and target.shape[1] == 1:
        target = target[:, 0]
    if target.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n_samples,), got shape {target.shape}")
    if target.shape[0] != n_samples:
        raise ValueError(f"{name} has {target.shape[0]} values but X has {n_samples} samples")
    _check_finite(target[:, None], name)
    return np.ascontiguousarray(target)


def _check_finite(array: np.ndarray, name: str) -> None:
    if np.isfinite(array).all():
        return
    bad = np.argwhere(~np.isfinite(array))[0]
    row, column = int(bad[0]), int(bad[1])
    kind = "NaN" if np.isnan(array[row, column]) else "infinite"
    where = f"row {row}" if array.shape[1] == 1 else f"row {row}, column {column}"
    raise ValueError(f"{name} contains a {kind} value at {where}")


def check_n_components(n_components) -> int:
    if isinstance(n_components, bool) or not isinstance(n_components, numbers.Integral) or n_components < 1:
        raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
    return int(n_components)


def check_positive(value, name: str, *, integer: bool = False, allow_zero: bool = False) -> None:
    kinds = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kinds) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a finite number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {what} {bound}, got {value!r}")


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
