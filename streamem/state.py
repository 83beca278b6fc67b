"""Model state as JSON: a versioned document, validated with pydantic on load.

Loading runs no code: the document is data (numbers, names, lists), checked
field by field and shape by shape before any of it reaches a model. A wrong,
truncated or tampered document raises `StateError` naming what is wrong.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "Count",
    "FORMAT_VERSION",
    "FitDocument",
    "OnlineStateDocument",
    "StateError",
    "parse_fit",
    "parse_state",
]

FORMAT_VERSION = 1

# A count (records, updates, offsets): JSON writers (orjson) take integers below 2**63 only, so a
# larger one would load and then make every later save fail; refused at load instead.
Count = Annotated[int, Field(ge=0, lt=2**63)]


class StateError(ValueError):
    """A model-state document that cannot be loaded."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class StepDocument(_Strict):
    alpha: float
    t0: float
    eta_min: float


class EngineDocument(_Strict):
    n_updates: float = Field(ge=0, lt=2**63)
    stats: dict[str, list | str]  # a statistics document (`SufficientStatistics.to_dict`)
    averaged: dict[str, list | float] | None = None
    n_averaged: Count
    pending: dict[str, list | str] | None = None  # statistics applied since the last update (`apply`)
    averaging_start: float | None = Field(default=None, ge=0, lt=2**63)  # Polyak averaging's first update


class OnlineStateDocument(_Strict):
    format: Literal["streamem.OnlineGMM", "streamem.OnlineRegressionMixture"]
    version: int
    params: dict[str, int | float | str | bool | None | list[str] | StepDocument]
    features: list[str] | None
    n_seen: Count
    n_outliers: Count = 0  # records the outlier guard refused (absent before it existed)
    buffer: list[list[float]]
    engine: EngineDocument | None


def json_object(document, what: str) -> dict:
    """A dict, or JSON text of an object, as a dict (StateError naming `what` otherwise)."""
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StateError(f"{what} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise StateError(f"{what} must be a JSON object, got {type(document).__name__}")
    return document


def parse_state(document, expected_format: str) -> OnlineStateDocument:
    """Validate a state dict (or its JSON text) and return it typed."""
    document = json_object(document, "model state")
    version = document.get("version")
    if version != FORMAT_VERSION:
        raise StateError(f"model state has format version {version!r}; this streamem reads version {FORMAT_VERSION}")
    try:
        parsed = OnlineStateDocument.model_validate(document)
    except ValidationError as error:
        raise StateError(f"invalid model state: {error}") from None
    if parsed.format != expected_format:
        raise StateError(f"model state is a {parsed.format!r}, not a {expected_format!r}")
    return parsed


def check_array(value, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A list from a state document as a finite float array of exactly `shape`."""
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise StateError(f"model state field {name!r} is not a numeric array") from None
    if array.shape != shape:
        raise StateError(f"model state field {name!r} has shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)):
        raise StateError(f"model state field {name!r} contains non-finite values")
    return array


class FitDocument(BaseModel):
    """`streamem fit`'s model.json, as far as an online model needs it."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)
    format: Literal["streamem.fit"]
    version: Literal[1]
    family: Literal["gaussian", "regression"]
    features: list[str] = Field(min_length=1)
    n_components: int = Field(ge=1)
    n_samples: int = Field(ge=1, lt=2**63)
    covariance_type: Literal["full", "tied", "diag", "spherical"] | None = None
    missing: Literal["error", "marginalize"] | None = None
    statistics: dict[str, list | str]  # a statistics document (`SufficientStatistics.to_dict`), per record


def parse_fit(document, family: str) -> FitDocument:
    """Validate a fit document (a path to model.json, its JSON text, or a dict) of the given family."""
    import pathlib

    if isinstance(document, pathlib.Path) or (isinstance(document, str) and not document.lstrip().startswith("{")):
        document = pathlib.Path(document).read_text()
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as error:
            raise StateError(f"fit document is not valid JSON: {error}") from None
    try:
        fit = FitDocument.model_validate(document)
    except ValidationError as error:
        raise StateError(f"invalid fit document: {error}") from None
    if fit.family != family:
        raise StateError(f"the fit is of a {fit.family} mixture, not a {family} mixture")
    return fit


def checked_statistics(stats: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Statistics from a document as finite arrays of the expected shapes, that sums of weights and of
    squares could be (or StateError naming the field)."""
    checked = {name: check_array(stats.get(name), shape, f"stats.{name}") for name, shape in shapes.items()}
    d = shapes["shift"][0] if "shift" in shapes else None
    for name, array in checked.items():
        if name in _SUMS_OF_SQUARES or name == "mass":
            packed = name == "second" and d is not None and d > 1 and array.shape[1] != d  # full/tied, not diag
            _check_sum_of_squares(array, name, packed)
    return checked


# Statistics that are weighted sums of x x^T (or of squares): positive semi-definite by construction.
# One that is not (a tampered or corrupted checkpoint) would be clipped silently by the M-step and
# then make every record an outlier, so it is refused at load. The tolerance allows for rounding.
_SUMS_OF_SQUARES = {"second", "xx", "yy"}
_TOLERANCE = 1e-9


def _check_sum_of_squares(array: np.ndarray, name: str, packed: bool) -> None:
    """`packed`: rows are upper triangles of d x d matrices (full and tied moments), else diagonals."""
    matrices = None
    if array.ndim == 3:  # (K, p, p) matrices
        matrices = array
    elif packed:
        d = int(round((np.sqrt(8 * array.shape[1] + 1) - 1) / 2))
        rows, cols = np.triu_indices(d)
        matrices = np.empty((array.shape[0], d, d))
        matrices[:, rows, cols] = array
        matrices[:, cols, rows] = array
    if matrices is None:  # masses, diagonal moments, yy: non-negative numbers
        scale = _TOLERANCE * max(1.0, float(np.max(np.abs(array), initial=0.0)))
        if np.any(array < -scale):
            raise StateError(f"model state field 'stats.{name}' has negative values: it must be a sum of squares")
        return
    if not np.allclose(matrices, np.swapaxes(matrices, 1, 2), rtol=1e-9, atol=0.0):
        raise StateError(f"model state field 'stats.{name}' is not symmetric")
    check_moment_matrices(matrices, f"'stats.{name}'")


def check_moment_matrices(matrices: np.ndarray, what: str) -> None:
    """Each symmetric (p, p) matrix of `matrices` (K, p, p) is a sum of z z^T, positive semi-definite up
    to rounding (StateError naming `what` and the component otherwise)."""
    eigenvalues = np.linalg.eigvalsh(matrices)
    scale = _TOLERANCE * np.maximum(1.0, np.max(np.abs(eigenvalues), axis=1))
    bad = np.flatnonzero(eigenvalues[:, 0] < -scale)
    if bad.size:
        raise StateError(
            f"model state field {what} is not positive semi-definite (component {int(bad[0])}: "
            f"eigenvalue {eigenvalues[bad[0], 0]:.3g}): it must be a sum of x x^T"
        )
