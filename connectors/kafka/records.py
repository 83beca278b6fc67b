"""Record schemas: decode and validate input records; build assignment, dead-letter and drift records.

Input: a JSON object per Kafka message with at least the configured feature
fields (and the target, for a regression mixture), each a finite number. Other
fields are ignored. Validation is a pydantic model built for the configured
fields, parsed straight from the message bytes; a batch of plain records is
decoded by msgspec, which accepts no record the pydantic model refuses.

Outputs are JSON (see the README for their fields). Each carries the source
coordinates of the input record it answers, so downstream can de-duplicate the
records answered twice after a crash.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import re
from collections.abc import Sequence
from operator import attrgetter, itemgetter
from typing import NamedTuple

import msgspec
import numpy as np
import orjson
from pydantic import ConfigDict, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from streamem_connectors.kafka.text import shorten

__all__ = [
    "DEAD_LETTER_ERROR_CHARACTERS",
    "DEAD_LETTER_KEY_BYTES",
    "DEAD_LETTER_VALUE_BYTES",
    "MESSAGE_KEY_BYTES",
    "MODEL_KEY_CHARACTERS",
    "DecodedBatch",
    "InputBatch",
    "InputRecord",
    "OutputRecord",
    "RecordDecoder",
    "assignments",
    "dead_letter",
    "drift_record",
    "regime_change_record",
    "source_of",
]


# Bounds that keep every output record far below a producer's 1 MiB request limit, whatever came in.
# Worst case, a dead letter of control bytes (JSON escapes each as 6 bytes: \u0001) holds
# 6 x 64 KiB of value + 6 x 1 KiB of key (+ 1 KiB raw as its Kafka key) + 4 KiB characters of error.
DEAD_LETTER_VALUE_BYTES = 64 * 1024  # bytes of the original payload kept: plenty to diagnose it
DEAD_LETTER_KEY_BYTES = 1024
DEAD_LETTER_ERROR_CHARACTERS = 4096
MODEL_KEY_CHARACTERS = 256  # a model key names a model (a sensor, a site): longer is a bad record
# An assignment carries its record's key twice (as its Kafka key, and escaped in its JSON, up to 6x):
# a record with a longer key is a bad record, or its answer could exceed the request limit.
MESSAGE_KEY_BYTES = 16 * 1024
_SHOWN_CHARACTERS = 80  # of a bad field's value, quoted in its error
# pydantic's JSON parser refuses values nested deeper than about 200, and numbers of more than 4,300
# digits; msgspec skips the fields it ignores without either limit (and reads such numbers). A record
# with fewer brackets than this cannot be nested that deep, and one without a run of that many digits
# holds no such number.
_PLAIN_BRACKETS = 190
_PYDANTIC_DIGITS = 4300
# a run of more digits; the look-behind starts a match only where a run starts (linear, not quadratic, in a
# value of many long numbers)
_LONG_NUMBER = re.compile(rb"(?<![0-9])[0-9]{%d}" % (_PYDANTIC_DIGITS + 1))


class InputRecord(NamedTuple):
    """One consumed message (a NamedTuple: often built for every record of a batch, so it must be cheap)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


_new_tuple = tuple.__new__  # builds a NamedTuple from its fields in C, without a Python call per record
_TOPIC, _PARTITION, _OFFSET, _KEY = (itemgetter(i) for i in range(4))  # an InputRecord's fields
_MODEL_KEY = attrgetter("model_key")  # of a record decoded by msgspec


class DecodedBatch(NamedTuple):
    """A poll batch, decoded: the valid records' numbers and keys, and why the others are not valid."""

    values: np.ndarray  # (n_good, n_numbers): the features, then the target, as floats
    keys: list | None  # the model key of each valid record (None without --model-key)
    good: list[int]  # batch positions of the valid records, in order
    errors: list[tuple[int, str]]  # (batch position, what is wrong) of the others


class InputBatch(NamedTuple):
    """A poll batch as columns: what the clients hand over and the model process is sent.

    Columns, not records: a batch of 1024 is built from the client's messages in a few C-level
    passes, and pickled to the model process as five lists (one topic: a consumer subscribes to
    one input topic), where the learner takes it as `records_view()`. `decoded`: the
    values decoded already (the consume loop decodes them beside its polling, while the model
    process answers the batches before), or None.
    """

    topic: str
    partitions: list[int]
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    decoded: DecodedBatch | None = None

    @property
    def size(self) -> int:
        return len(self.offsets)

    def records(self) -> list[InputRecord]:
        columns = zip(itertools.repeat(self.topic), self.partitions, self.offsets, self.keys, self.values)
        return list(map(_new_tuple, itertools.repeat(InputRecord), columns))

    def records_view(self) -> BatchRecords:
        """The batch as a sequence of `InputRecord`s made only when asked for."""
        return BatchRecords(self)

    def split(self, size: int) -> list[InputBatch]:
        """This batch (not decoded yet) in batches of at most `size` records, in order; none if empty."""
        if self.size <= size:
            return [self] if self.size else []
        return [
            InputBatch(self.topic, self.partitions[i : i + size], self.offsets[i : i + size], self.keys[i : i + size],
                       self.values[i : i + size])
            for i in range(0, self.size, size)
        ]

    def decoded_by(self, decoder: RecordDecoder) -> InputBatch:
        """This batch with its values decoded (`decoded`)."""
        return self._replace(decoded=decoder.decode_batch(self.values, self.keys))

    def next_offsets(self) -> dict[tuple[str, int], int]:
        """The offset after the last record of each partition in the batch."""
        last = dict(zip(self.partitions, self.offsets))  # a partition's records come in offset order
        return {(self.topic, partition): offset + 1 for partition, offset in last.items()}


class BatchRecords(Sequence):
    """The records of an `InputBatch`, each made only when asked for (iterating makes them all at once). The
    assignments of a whole batch are built from its columns (`assignments`), so the instance's mixture makes
    records of a batch of valid records only where one is needed (a drift record; a dead letter or a warm-up
    ending within the batch makes them all, once), where an `InputRecord` per record had cost 0.15-0.3 us, a
    twentieth of the model process's work for it. A learner that reads records one by one takes them as a
    list (`Learner.valid_records`)."""

    __slots__ = ("batch",)

    def __init__(self, batch: InputBatch):
        self.batch = batch

    def __len__(self) -> int:
        return self.batch.size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return InputBatch(self.batch.topic, *(column[i] for column in self.batch[1:5])).records()
        batch = self.batch
        return InputRecord(batch.topic, batch.partitions[i], batch.offsets[i], batch.keys[i], batch.values[i])

    def __iter__(self):
        return iter(self.batch.records())


class OutputRecord(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes


class RecordDecoder:
    """Turns message bytes into a row of feature values (and a target), or a precise error.

    Validation is a pydantic `TypeAdapter` over a `TypedDict` of the configured
    fields, parsed straight from the bytes by pydantic-core: it defines which records
    are valid, and says what is wrong with the others. A batch is first decoded by a
    msgspec `Struct` of the same fields (about a third of pydantic's cost). msgspec is
    as strict on those fields (numbers: JSON integers or floats, not booleans or
    strings; keys: strings or integers) but skips the others without checking them as
    pydantic does, so its result is taken only for a batch that is valid UTF-8, nested
    less than `_PLAIN_BRACKETS` deep and without numbers of over 4,300 digits (which
    pydantic refuses). Any other batch, and any batch msgspec refuses, goes through
    pydantic record by record: both paths give the same rows (tests/test_kafka_records.py
    checks it on generated records).
    """

    def __init__(self, features: list[str], target: str | None = None, model_key: str | None = None):
        """Values come back as features, then the target, then the model key (a string or an integer)."""
        self.numbers = list(features) + ([target] if target is not None else [])
        self.model_key = model_key
        number = StrictFloat | StrictInt  # JSON true/false and "1.5" are not numbers here
        types = {name: number for name in self.numbers}
        if model_key is not None:
            types[model_key] = StrictStr | StrictInt
        schema = TypedDict("StreamemRecord", types)
        schema.__pydantic_config__ = ConfigDict(extra="ignore", allow_inf_nan=False)
        self._validate = TypeAdapter(schema).validator.validate_json
        pick = itemgetter(*self.numbers)
        self._numbers = pick if len(self.numbers) > 1 else (lambda record: (pick(record),))
        self._fast_decode, self._fast_columns = self._fast_decoder()

    def _fast_decoder(self):
        """(msgspec's decode of one value, a getter of each number of a decoded record); Nones when a field
        is named twice (the pydantic schema keeps one of them) or a name is one msgspec cannot match: then
        pydantic alone decodes."""
        names = [*self.numbers, *([self.model_key] if self.model_key is not None else [])]
        if len(set(names)) != len(names):
            return None, None
        # attribute names of our own: the fields' names need not be Python identifiers
        attributes = [f"number_{i}" for i in range(len(self.numbers))]
        fields: list = [(name, float) for name in attributes]
        if self.model_key is not None:
            fields.append(("model_key", str | int))
            attributes_and_key = [*attributes, "model_key"]
        else:
            attributes_and_key = attributes
        try:
            struct = msgspec.defstruct(
                "StreamemRecord", fields, rename=dict(zip(attributes_and_key, names, strict=True)), gc=False
            )
        except ValueError:  # a name JSON must escape (a quote, a backslash, a control character): pydantic alone
            return None, None
        return msgspec.json.Decoder(struct).decode, [attrgetter(name) for name in attributes]

    def decode(self, value: bytes | None, message_key: bytes | None = None) -> tuple:
        """The record's field values in configured order (numbers as floats, then the model key);
        raises `ValueError` saying what is wrong."""
        if message_key is not None and len(message_key) > MESSAGE_KEY_BYTES:
            raise ValueError(f"message key too long ({len(message_key)} bytes, limit {MESSAGE_KEY_BYTES})")
        if not value:
            raise ValueError("empty message (no JSON value)")
        try:
            record = self._validate(value)
        except ValidationError as error:
            raise ValueError(_describe(error)) from None
        numbers = []
        for name, number in zip(self.numbers, self._numbers(record), strict=True):
            try:
                numbers.append(float(number))
            except OverflowError:  # an integer literal beyond the float range
                raise ValueError(f"field {name!r} is not finite (too large for a float)") from None
        if self.model_key is not None:
            key = record[self.model_key]
            self._check_model_key(key)
            numbers.append(key)
        return tuple(numbers)

    def _check_model_key(self, key: str | int) -> None:
        # An integer's digits are counted without str(): beyond 4,300 digits str() itself raises.
        length = len(key) if isinstance(key, str) else _digits(key)
        if length > MODEL_KEY_CHARACTERS:
            raise ValueError(
                f"field {self.model_key!r} is too long for a model key ({length} characters, "
                f"limit {MODEL_KEY_CHARACTERS})"
            )

    def decode_batch(self, values: list[bytes | None], message_keys: list[bytes | None] | None = None) -> DecodedBatch:
        """Decode a poll batch (and check the messages' keys, when given). A batch of valid records
        (the usual case) is decoded in one pass; a batch with an invalid record is decoded again
        record by record, to say what is wrong."""
        if message_keys is not None and max(map(len, filter(None, message_keys)), default=0) > MESSAGE_KEY_BYTES:
            return self._decode_one_by_one(values, message_keys)
        width = len(self.numbers)
        if self._fast_decode is None or not _plain(values):
            return self._decode_one_by_one(values)
        try:  # each pass in C but the decoding itself (map, fromiter): no Python call per record
            records = list(map(self._fast_decode, values))
            numbers = np.empty((len(values), width))
            for column, number in enumerate(self._fast_columns):  # a column a pass: no tuple per record
                numbers[:, column] = np.fromiter(map(number, records), dtype=float, count=len(values))
            keys = None if self.model_key is None else list(map(_MODEL_KEY, records))
        except (ValueError, RecursionError):  # msgspec's ValidationError and DecodeError are ValueErrors
            return self._decode_one_by_one(values)
        if not np.isfinite(numbers).all() or (keys is not None and not all(map(_short_key, keys))):
            return self._decode_one_by_one(values)
        return DecodedBatch(numbers, keys, list(range(len(values))), [])

    def _decode_one_by_one(self, values: list[bytes | None], message_keys=None) -> DecodedBatch:
        rows, good, errors = [], [], []
        for i, value in enumerate(values):
            try:
                rows.append(self.decode(value, None if message_keys is None else message_keys[i]))
                good.append(i)
            except ValueError as error:
                errors.append((i, str(error)))
        width = len(self.numbers)
        numbers = np.array([row[:width] for row in rows], dtype=float).reshape(len(rows), width)
        keys = None if self.model_key is None else [row[width] for row in rows]
        return DecodedBatch(numbers, keys, good, errors)


def _plain(values: list) -> bool:
    """Whether every value is bytes, valid UTF-8, with fewer than `_PLAIN_BRACKETS` brackets and no number of
    over 4,300 digits: what pydantic checks in the fields msgspec skips. The batch is never copied whole (its
    values may be large): only a value that is not ASCII, alone, to check it is UTF-8."""
    if set(map(type, values)) - {bytes}:  # None (a message without a value), or what a client should not give
        return False
    if not all(map(bytes.isascii, values)):  # ASCII is UTF-8: the usual case, checked without a copy
        try:
            for value in values:
                value.decode("utf-8")
        except UnicodeDecodeError:
            return False
    if max(map(len, values), default=0) < _PLAIN_BRACKETS:
        return True
    return all(
        value.count(b"[") + value.count(b"{") < _PLAIN_BRACKETS
        and (len(value) <= _PYDANTIC_DIGITS or _LONG_NUMBER.search(value) is None)
        for value in values
    )


def _short_key(key: str | int) -> bool:
    return len(key) <= MODEL_KEY_CHARACTERS if isinstance(key, str) else _digits(key) <= MODEL_KEY_CHARACTERS


def _digits(number: int) -> int:
    """Characters of `str(number)`, computed without building it."""
    if number == 0:
        return 1
    sign = number < 0
    number = abs(number)
    digits = int(number.bit_length() * 0.30102999566398120) + 1  # log10(2): exact or one too many
    if number < 10 ** (digits - 1):
        digits -= 1
    return digits + sign


def _describe(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    kind, location = first["type"], first["loc"]
    field = location[0] if location else None
    if kind.startswith("json_"):
        return f"not valid JSON: {first['msg']}"
    if kind in ("model_type", "dict_type") or (not location and "dict" in first["msg"]):
        return "not a JSON object"
    if kind == "missing":
        return f"field {field!r} is missing"
    if kind == "finite_number":
        return f"field {field!r} is not finite (NaN or infinity)"
    received = first.get("input")
    try:
        shown = orjson.dumps(received).decode()
    except TypeError:  # not JSON (pydantic's input is the parsed value: it should be)
        shown = repr(received)
    shown = shorten(shown, _SHOWN_CHARACTERS)  # a 500 KB string would make a 500 KB error (and log line)
    if kind in ("string_type", "int_type") or "string" in first["msg"]:
        return f"field {field!r} is not a string or an integer: {shown}"
    return f"field {field!r} is not a number: {shown}"


def source_of(record: InputRecord) -> dict:
    return {"topic": record.topic, "partition": record.partition, "offset": record.offset}


def _text(raw: bytes | None) -> tuple[str | None, str]:
    if raw is None:
        return None, "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _json_rows(matrix: np.ndarray) -> list[bytes]:
    """Each row of a 2-D float array as JSON numbers separated by commas (one orjson call for all)."""
    return orjson.dumps(np.ascontiguousarray(matrix, dtype=float), option=_NUMPY)[2:-2].split(b"],[")


def _json_numbers(vector: np.ndarray) -> list[bytes]:
    return orjson.dumps(np.ascontiguousarray(vector, dtype=float), option=_NUMPY)[1:-1].split(b",")


@functools.lru_cache(maxsize=256)
def _json_string(text: str) -> bytes:
    return orjson.dumps(text)


def _json_key(key: bytes | None) -> bytes:
    return b"null" if key is None else orjson.dumps(_text(key)[0])


def _source_head(topic: str, partition: int) -> bytes:
    """An assignment record's bytes up to its source offset."""
    return b'{"source":{"topic":%s,"partition":%d,"offset":' % (_json_string(topic), partition)


def assignments(
    records: Sequence[InputRecord],
    topic: str,
    responsibilities: np.ndarray,
    log_likelihoods: np.ndarray,
    n_seen: int | list[int],
    predictions: np.ndarray | None = None,
    model_key: str | list[str] | None = None,
) -> list[OutputRecord]:
    """Assignment records for a batch: `records[j]` answered by row j of the arrays.

    `n_seen`: the records the model had learned before the first record (the next ones count up
    from it), or a list of each record's; `model_key`: the key of the model that answered them
    all, or a list of each record's (several keys' models answered together).

    The hot path of the consumer. The numbers of the whole batch are formatted by
    orjson at once and spliced into a fixed layout (the same bytes as a dict and an
    `orjson.dumps` per record, 3.5x faster), column by column.
    """
    if not records:
        return []
    probabilities = _json_rows(responsibilities)
    log_likelihood = _json_numbers(log_likelihoods)
    components = responsibilities.argmax(axis=1).tolist()
    if model_key is None or isinstance(model_key, str):
        endings = itertools.repeat((b"" if model_key is None else b',"model_key":' + _json_string(model_key)) + b"}")
    else:
        endings = [b',"model_key":%s}' % _json_string(key) for key in model_key]
    if predictions is not None:
        endings = [b',"prediction":' + number + end for number, end in zip(_json_numbers(predictions), endings)]
    # Column by column, each pass in C (map, zip, bytes %): no Python call per record.
    if isinstance(records, BatchRecords):  # a poll batch's columns as they are (one topic)
        batch = records.batch
        where, offsets, keys = batch.partitions, batch.offsets, batch.keys
        heads = {partition: _source_head(batch.topic, partition) for partition in set(where)}
    else:
        where, offsets = list(zip(map(_TOPIC, records), map(_PARTITION, records))), map(_OFFSET, records)
        keys = list(map(_KEY, records))
        heads = {(name, partition): _source_head(name, partition) for name, partition in set(where)}
    json_keys = itertools.repeat(b"null") if keys.count(None) == len(keys) else map(_json_key, keys)
    layout = b'%s%d},"key":%s,"component":%d,"probabilities":[%s],"log_likelihood":%s,"n_seen":%d%s'
    fields = zip(
        map(heads.__getitem__, where),
        offsets,
        json_keys,
        components,
        probabilities,
        log_likelihood,
        n_seen if isinstance(n_seen, (list, tuple)) else range(n_seen, n_seen + len(records)),
        endings,
    )
    values = map(layout.__mod__, fields)
    return list(map(_new_tuple, itertools.repeat(OutputRecord), zip(itertools.repeat(topic), keys, values)))


def _prefix(raw: bytes, limit: int) -> tuple[str, str]:
    """At most `limit` bytes of `raw` as text (cut on a character boundary) or, when `raw` as a whole
    is not UTF-8, as base64: the encoding says what the whole payload is."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(raw[:limit]).decode("ascii"), "base64"
    # `raw` is valid UTF-8, so the only invalid bytes of its prefix are a character cut at the end
    return raw[:limit].decode("utf-8", errors="ignore"), "utf-8"


def dead_letter(record: InputRecord, topic: str, error: str) -> OutputRecord:
    """{"source", "key", "error", "value", "encoding", "size", "sha256", "truncated", "key_truncated"}.

    `value` is the original payload as text or base64 (`encoding`), cut to its first
    `DEAD_LETTER_VALUE_BYTES` bytes (`truncated`); `size` and `sha256` are those of the whole
    payload (null for a message without one). The key (also the record's Kafka key) is cut to
    `DEAD_LETTER_KEY_BYTES`, the error to `DEAD_LETTER_ERROR_CHARACTERS`: a dead letter always
    fits a producer's request, whatever came in.
    """
    raw = record.value
    if raw is None:
        value, encoding, size, digest = None, "utf-8", None, None
    else:
        value, encoding = _prefix(raw, DEAD_LETTER_VALUE_BYTES)
        size, digest = len(raw), hashlib.sha256(raw).hexdigest()
    key = record.key
    key_truncated = key is not None and len(key) > DEAD_LETTER_KEY_BYTES
    body = {
        "source": source_of(record),
        "key": None if key is None else _prefix(key, DEAD_LETTER_KEY_BYTES)[0],
        "error": shorten(error, DEAD_LETTER_ERROR_CHARACTERS),
        "value": value,
        "encoding": encoding,
        "size": size,
        "sha256": digest,
        "truncated": size is not None and size > DEAD_LETTER_VALUE_BYTES,
        "key_truncated": key_truncated,
    }
    return OutputRecord(topic, key if not key_truncated else key[:DEAD_LETTER_KEY_BYTES], orjson.dumps(body))


def drift_record(
    record: InputRecord,
    topic: str,
    n_seen: int,
    weights,
    reference_weights,
    distance: float,
    drift: bool,
    model_key: str | None = None,
) -> OutputRecord:
    """{"source", "n_seen", "weights", "reference_weights", "distance", "drift"} (+ "model_key")."""
    body = {
        "source": source_of(record),
        "n_seen": n_seen,
        "weights": weights,
        "reference_weights": reference_weights,
        "distance": distance,
        "drift": drift,
    }
    if model_key is not None:
        body["model_key"] = model_key
    return OutputRecord(topic, None if model_key is None else model_key.encode(), orjson.dumps(body))


def regime_change_record(
    record: InputRecord,
    topic: str,
    n_seen: int,
    previous: int | None,
    state: int,
    probabilities,
    model_key: str | None = None,
) -> OutputRecord:
    """{"source", "n_seen", "regime_change": true, "from", "to", "probabilities"} (+ "model_key"): the
    partition (or model key) of `record` is now in hidden state `to` (its filtered probability at least
    the threshold), after `from` (null: the first regime announced there)."""
    body = {
        "source": source_of(record),
        "n_seen": n_seen,
        "regime_change": True,
        "from": previous,
        "to": state,
        "probabilities": probabilities,
    }
    if model_key is not None:
        body["model_key"] = model_key
    return OutputRecord(topic, None if model_key is None else model_key.encode(), orjson.dumps(body))
