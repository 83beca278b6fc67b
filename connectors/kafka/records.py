"""Record schemas: decode and validate input records; build assignment, dead-letter and drift records.

Input: a JSON object per Kafka message with at least the configured feature
fields (and the target, for a regression mixture), each a finite number. Other
fields are ignored. Validation is a pydantic model built for the configured
fields, parsed straight from the message bytes.

Outputs are JSON (see the README for their fields). Each carries the source
coordinates of the input record it answers, so downstream can de-duplicate the
records answered twice after a crash.
"""

from __future__ import annotations

import base64
import dataclasses

import orjson
from pydantic import ConfigDict, StrictFloat, StrictInt, ValidationError, create_model

__all__ = ["InputRecord", "OutputRecord", "RecordDecoder", "assignment", "dead_letter", "drift_record", "source_of"]


@dataclasses.dataclass(frozen=True, slots=True)
class InputRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclasses.dataclass(frozen=True, slots=True)
class OutputRecord:
    topic: str
    key: bytes | None
    value: bytes


class RecordDecoder:
    """Turns message bytes into a row of feature values (and a target), or a precise error."""

    def __init__(self, features: list[str], target: str | None = None):
        self.fields = list(features) + ([target] if target is not None else [])
        number = StrictFloat | StrictInt  # JSON true/false and "1.5" are not numbers here
        self._model = create_model(
            "StreamemRecord",
            __config__=ConfigDict(extra="ignore", allow_inf_nan=False),
            **{_field_name(i): (number, ...) for i in range(len(self.fields))},
        )
        self._aliases = {name: _field_name(i) for i, name in enumerate(self.fields)}
        # validation reads the record under the user's field names
        for name, alias in self._aliases.items():
            self._model.model_fields[alias].validation_alias = name
        self._model.model_rebuild(force=True)
        self._names = [_field_name(i) for i in range(len(self.fields))]

    def decode(self, value: bytes | None) -> list[float]:
        """The record's field values in configured order; raises `ValueError` saying what is wrong."""
        if value is None or len(value) == 0:
            raise ValueError("empty message (no JSON value)")
        try:
            record = self._model.model_validate_json(value)
        except ValidationError as error:
            raise ValueError(_describe(error)) from None
        values = record.__dict__
        return [float(values[name]) for name in self._names]


def _field_name(index: int) -> str:
    return f"f{index}"


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    kind, location = first["type"], first["loc"]
    field = location[0] if location else None
    if kind.startswith("json_"):
        return f"not valid JSON: {first['msg']}"
    if kind == "model_type" or (not location and "dict" in first["msg"]):
        return "not a JSON object"
    if kind == "missing":
        return f"field {field!r} is missing"
    if kind == "finite_number":
        return f"field {field!r} is not finite (NaN or infinity)"
    received = first.get("input")
    shown = orjson.dumps(received).decode() if _jsonable(received) else repr(received)
    return f"field {field!r} is not a number: {shown}"


def _jsonable(value) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def source_of(record: InputRecord) -> dict:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


def _text(raw: bytes | None) -> tuple[str | None, str]:
    if raw is None:
        return None, "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def assignment(
    record: InputRecord,
    topic: str,
    component: int,
    probabilities,
    log_likelihood: float,
    n_seen: int,
    prediction: float | None = None,
) -> OutputRecord:
    """{"source", "key", "component", "probabilities", "log_likelihood", "n_seen"} (+ "prediction")."""
    body = {
        "source": source_of(record),
        "key": _text(record.key)[0],
        "component": component,
        "probabilities": probabilities,
        "log_likelihood": log_likelihood,
        "n_seen": n_seen,
    }
    if prediction is not None:
        body["prediction"] = prediction
    return OutputRecord(topic, record.key, orjson.dumps(body))


def dead_letter(record: InputRecord, topic: str, error: str) -> OutputRecord:
    """{"source", "key", "error", "value", "encoding"}: the original payload, as text or base64."""
    value, encoding = _text(record.value)
    body = {
        "source": source_of(record),
        "key": _text(record.key)[0],
        "error": error,
        "value": value,
        "encoding": encoding,
    }
    return OutputRecord(topic, record.key, orjson.dumps(body))


def drift_record(
    record: InputRecord, topic: str, n_seen: int, weights, reference_weights, distance: float, drift: bool
) -> OutputRecord:
    """{"source", "n_seen", "weights", "reference_weights", "distance", "drift"}."""
    body = {
        "source": source_of(record),
        "n_seen": n_seen,
        "weights": weights,
        "reference_weights": reference_weights,
        "distance": distance,
        "drift": drift,
    }
    return OutputRecord(topic, None, orjson.dumps(body))
