"""Input checks shared by every estimator: arrays in, precise errors out."""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = [
    "check_array",
    "check_choice",
    "check_feature_value",
    "check_n_components",
    "check_positive",
    "check_target",
    "check_target_value",
    "frame_values",
    "record_values",
    "record_values_with_missing",
]


def check_array(
    X, *, name: str = "X", n_features: int | None = None, min_samples: int = 1, allow_missing: bool = False
) -> np.ndarray:
    """Return `X` as a finite float64 array of shape (n_samples, n_features).

    Raises a `ValueError` naming the problem: empty input, wrong number of
    dimensions or features, non-numeric entries, NaN or infinite values (with the
    position of the first one). With `allow_missing`, NaN (or None) marks a missing
    value; infinities and records with no observed value are still refused.
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
    if allow_missing:
        missing = np.isnan(array)
        _check_finite(np.where(missing, 0.0, array), name)
        if missing.all(axis=1).any():
            raise ValueError(f"{name} row {int(np.argmax(missing.all(axis=1)))} has no observed value")
    else:
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


def record_values(x, names) -> list:
    """The values of features `names` from a dict record, each a finite number.

    Fast path: one `math.fsum` over the values raises on a non-number and returns a
    non-finite total for NaN or inf, so a good record costs one pass. Anything
    else goes to `_record_error`, which names the first faulty feature.
    """
    try:
        row = [x[name] for name in names]
    except (KeyError, TypeError):
        _record_error(x, names)
    if len(x) != len(row):
        _record_error(x, names)
    try:
        if math.isfinite(math.fsum(row)):
            return row
    except (TypeError, ValueError, OverflowError):
        pass
    _record_error(x, names)
    return row  # every value was finite but their sum overflowed: the record is fine


def record_values_with_missing(x, names) -> list:
    """Like `record_values`, but None or NaN marks a missing feature (returned as NaN)."""
    if not isinstance(x, dict):
        raise TypeError(f"a record must be a dict of feature name -> number, got {type(x).__name__}")
    known = set(names)
    for name in x:
        if name not in known:
            raise ValueError(f"unexpected feature {name!r}; the model's features are {list(names)}")
    row = []
    for name in names:
        value = x.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            row.append(math.nan)
            continue
        check_feature_value(name, value)
        row.append(float(value))
    if all(math.isnan(v) for v in row):
        raise ValueError("the record has no observed feature")
    return row


def _record_error(x, names) -> None:
    if not isinstance(x, dict):
        raise TypeError(f"a record must be a dict of feature name -> number, got {type(x).__name__}")
    for name in names:
        if name not in x:
            raise ValueError(f"feature {name!r} is missing from the record")
    known = set(names)
    for name in x:
        if name not in known:
            raise ValueError(f"unexpected feature {name!r}; the model's features are {list(names)}")
    for name in names:
        check_feature_value(name, x[name])


def check_feature_value(name, value) -> None:
    """Raise TypeError for a non-number, ValueError for NaN or inf, naming the feature."""
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"feature {name!r} is not a number: {value!r}")
    if math.isnan(value):
        raise ValueError(f"feature {name!r} is NaN")
    if math.isinf(value):
        raise ValueError(f"feature {name!r} is infinite")


def check_target_value(y) -> float:
    """A regression target: a finite real number."""
    if isinstance(y, (str, bytes)) or not isinstance(y, numbers.Real):
        raise TypeError(f"target is not a number: {y!r}")
    if not math.isfinite(y):
        raise ValueError(f"target is {'NaN' if math.isnan(y) else 'infinite'}")
    return float(y)


def frame_values(X, columns, allow_missing: bool = False) -> np.ndarray:
    """The DataFrame columns `columns` as a finite float array; errors name the column and row.

    Non-numeric columns are refused value by value: pandas would parse the string
    "1.5" silently, and a string is a bad record, not a number.
    """
    import pandas as pd

    if isinstance(X, np.ndarray):
        return array_values(X, columns, allow_missing)
    if not isinstance(X, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame or a 2-D numpy array, got {type(X).__name__}")
    columns = list(columns)
    dtypes = X.dtypes
    for name in columns:
        if not pd.api.types.is_numeric_dtype(dtypes[name]):
            for index, value in X[name].items():
                if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Real, np.number)):
                    raise TypeError(f"feature {name!r} is not a number in row {index!r}: {value!r}")
    # selecting columns copies the frame in pandas; skip it when the order already matches
    values = (X if list(X.columns) == columns else X[columns]).to_numpy(dtype=float)
    return _finite(np.ascontiguousarray(values), columns, allow_missing, lambda row: repr(X.index[row]))


def array_values(X: np.ndarray, columns, allow_missing: bool = False) -> np.ndarray:
    """A 2-D array whose columns are `columns`, in order, as finite floats; errors name the column and row."""
    columns = list(columns)
    if X.ndim != 2 or X.shape[1] != len(columns):
        raise ValueError(f"expected an array of shape (n, {len(columns)}) with columns {columns}, got {X.shape}")
    if X.dtype.kind not in "fiub":
        raise TypeError(f"expected a numeric array, got dtype {X.dtype}")
    return _finite(np.ascontiguousarray(X, dtype=float), columns, allow_missing, str)


def _finite(values: np.ndarray, columns: list, allow_missing: bool, row_name) -> np.ndarray:
    """`values` if every value is finite (NaN allowed as a missing value with `allow_missing`, as long as
    each row has one observed); else ValueError naming the column and the row (`row_name(position)`)."""
    bad = ~np.isfinite(values)
    if allow_missing:
        bad &= ~np.isnan(values)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(values[row, column]) else "infinite"
        raise ValueError(f"feature {columns[column]!r} is {kind} in row {row_name(int(row))}")
    if allow_missing and np.isnan(values).all(axis=1).any():
        raise ValueError(f"row {row_name(int(np.argmax(np.isnan(values).all(axis=1))))} has no observed feature")
    return values
