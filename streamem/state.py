"""Model state as JSON: a versioned document, validated with pydantic on load.

Loading runs no code: the document is data (numbers, names, lists), checked
field by field and shape by shape before any of it reaches a model. A wrong,
truncated or tampered document raises `StateError` naming what is wrong.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["FORMAT_VERSION", "FitDocument", "OnlineStateDocument", "StateError", "parse_fit", "parse_state"]

FORMAT_VERSION = 1


class StateError(ValueError):
    """A model-state document that cannot be loaded."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class StepDocument(_Strict):
    alpha: float
    t0: float
    eta_min: float


class EngineDocument(_Strict):
    n_updates: float = Field(ge=0)
    stats: dict[str, list]
    averaged: dict[str, list | float] | None = None
    n_averaged: int = Field(ge=0)


class OnlineStateDocument(_Strict):
    format: Literal["streamem.OnlineGMM", "streamem.OnlineRegressionMixture"]
    version: int
    params: dict[str, int | float | str | bool | None | list[str] | StepDocument]
    features: list[str] | None
    n_seen: int = Field(ge=0)
    n_outliers: int = Field(0, ge=0)  # records the outlier guard refused (absent before it existed)
    buffer: list[list[float]]
    engine: EngineDocument | None


def parse_state(document, expected_format: str) -> OnlineStateDocument:
    """Validate a state dict (or its JSON text) and return it typed."""
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as error:
            raise StateError(f"model state is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise StateError(f"model state must be a JSON object, got {type(document).__name__}")
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
    n_samples: int = Field(ge=1)
    covariance_type: Literal["full", "tied", "diag", "spherical"] | None = None
    missing: Literal["error", "marginalize"] | None = None
    statistics: dict[str, list]


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
    """Statistics from a document as finite arrays of the expected shapes (or StateError)."""
    return {name: check_array(stats.get(name), shape, f"stats.{name}") for name, shape in shapes.items()}
