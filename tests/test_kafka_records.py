"""Record decoding and the assignment records' bytes (no broker needed)."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamem_connectors.kafka.records import InputRecord, RecordDecoder, assignments

BAD = [
    b"not json",
    b"[1, 2]",
    b'{"a": 1.0}',
    b'{"a": "1.5", "b": 2.0}',
    b'{"a": NaN, "b": 2.0}',
    b'{"a": true, "b": 2.0}',
    b'{"a": null, "b": 2.0}',
    b"",
    None,
    b"\xff\xfe",
    b'{"a": 1' + b"0" * 400 + b', "b": 2}',  # an integer beyond the float range
]

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
good = st.builds(lambda a, b: json.dumps({"a": a, "b": b, "other": "x"}).encode(), finite, finite)
value = st.one_of(good, st.sampled_from(BAD))


@settings(max_examples=200, deadline=None)
@given(st.lists(value, min_size=1, max_size=30))
def test_a_batch_decodes_as_its_records_do_one_by_one(values):
    decoder = RecordDecoder(["a", "b"])
    decoded = decoder.decode_batch(values)
    expected_rows, expected_good, expected_errors = [], [], []
    for i, raw in enumerate(values):
        try:
            expected_rows.append(decoder.decode(raw))
            expected_good.append(i)
        except ValueError as error:
            expected_errors.append((i, str(error)))
    assert decoded.good == expected_good
    assert decoded.errors == expected_errors
    assert decoded.values.shape == (len(expected_good), 2)
    np.testing.assert_array_equal(decoded.values, np.array(expected_rows, dtype=float).reshape(-1, 2))


# Raw JSON text for a field, including what the fast path (msgspec) and pydantic might read differently.
_number_text = st.one_of(
    finite.map(json.dumps),
    st.integers().map(str),  # any size: beyond 64 bits, beyond the float range
    st.from_regex(r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "true", "null", '"1.5"', "01", "1.", ".5", "+1", "-0", "1e400",
                     "-1e400", "1e-400", "[1]", "{}"]),
)
_key_text = st.one_of(
    st.text(max_size=300).map(json.dumps),
    st.integers().map(str),
    st.sampled_from(["true", "1.5", "null", '"\\ud800"', '"a\tb"']),
)
_ignored_text = st.sampled_from([
    '"x"', "1e999", "NaN", "[1,]", '"\\u0000"', "[" * 250 + "]" * 250, "[" * 150 + "]" * 150,
    '{"a":' * 195 + "1" + "}" * 195, "[" + ",".join(["{}"] * 200) + "]", "9" * 4301, "9" * 4300 + ".5",
])
_ignored_bytes = st.sampled_from([b'"\xff"', b'"\xed\xa0\x80"', b'"\x01"', b'"caf\xc3\xa9"', b'"\xc3"'])


@st.composite
def _raw_record(draw):
    """A JSON object (or not quite) with the fields a, b and site in any order, some twice or missing,
    beside ignored fields that pydantic checks and msgspec skips."""
    fields = [(name, draw(_number_text)) for name in ("a", "b")] + [("site", draw(_key_text))]
    fields += [(name, draw(_number_text)) for name in draw(st.lists(st.sampled_from(["a", "b"]), max_size=2))]
    fields = [field for field in fields if not draw(st.integers(0, 9)) == 0]  # now and then a field is missing
    parts = [f'"{name}":{text}'.encode() for name, text in draw(st.permutations(fields))]
    parts += [b'"other":' + (draw(_ignored_bytes) if draw(st.booleans()) else draw(_ignored_text).encode())
              for _ in range(draw(st.integers(0, 2)))]
    return b"{" + b",".join(parts) + b"}"


@settings(max_examples=600, deadline=None)
@given(st.lists(_raw_record(), min_size=1, max_size=4))
def test_the_fast_path_accepts_exactly_what_pydantic_accepts(values):
    """A batch is decoded by msgspec unless pydantic would see it differently: each record alone, and the
    batch, come back as `decode` (pydantic) reads them, to the bit."""
    decoder = RecordDecoder(["a", "b"], model_key="site")

    def one_by_one(raws):
        rows, errors = [], []
        for i, raw in enumerate(raws):
            try:
                rows.append(decoder.decode(raw))
            except ValueError as error:
                errors.append((i, str(error)))
        return rows, errors

    for batch in [[raw] for raw in values] + [values]:
        decoded = decoder.decode_batch(batch)
        rows, errors = one_by_one(batch)
        assert decoded.errors == errors
        assert decoded.keys == [row[2] for row in rows]
        assert [type(key) for key in decoded.keys] == [type(row[2]) for row in rows]
        expected = np.array([row[:2] for row in rows], dtype=float).reshape(-1, 2)
        assert decoded.values.tobytes() == expected.tobytes()  # to the bit: -0.0 is not 0.0 here


def test_a_batch_of_plain_records_is_decoded_without_pydantic(monkeypatch):
    """The fast path is taken: a batch of plain records (and one whose ignored field holds many long
    numbers, up to 4,300 digits each) decodes with pydantic's record-by-record `decode` out of reach."""
    decoder = RecordDecoder(["a", "b"], model_key="site")
    many_long_numbers = b'{"a": 1, "b": 2, "site": "s", "z": [' + b",".join([b"1" * 4300] * 30) + b"]}"
    batch = [b'{"a": 1.5, "b": -0.0, "site": "caf\xc3\xa9"}', b'{"b": 3, "a": 4, "site": 7}', many_long_numbers]

    def refuse(*args, **kwargs):
        raise AssertionError("pydantic's path was taken")

    monkeypatch.setattr(RecordDecoder, "decode", refuse)
    decoded = decoder.decode_batch(batch)
    assert decoded.good == [0, 1, 2] and decoded.keys == ["caf\u00e9", 7, "s"]
    assert decoded.values.tobytes() == np.array([[1.5, -0.0], [4.0, 3.0], [1.0, 2.0]]).tobytes()


def test_a_non_ascii_record_before_a_tombstone_is_decoded_not_a_crash():
    """A batch with valid non-ASCII text before a value-less message (a tombstone) decodes as its records do
    alone: the tombstone is a bad record, not an AttributeError that stops the consumer."""
    decoder = RecordDecoder(["a"], model_key="site")
    decoded = decoder.decode_batch([b'{"a": 1, "site": "caf\xc3\xa9"}', None, b'{"a": 2, "site": "x"}'])
    assert decoded.good == [0, 2]
    assert decoded.keys == ["caf\u00e9", "x"]
    assert decoded.errors == [(1, "empty message (no JSON value)")]


@pytest.mark.parametrize("digits", [4300, 4301])
@pytest.mark.parametrize("where", ["ignored", "feature"])
def test_a_number_of_over_4300_digits_is_read_alike_in_any_batch(digits, where):
    """pydantic refuses a number with more than 4,300 digits (msgspec takes it): a record holding one is
    decoded alike alone and beside good records, in a field that is ignored or in a feature."""
    long_number = b"1" * digits + (b"e-%d" % digits if where == "feature" else b"")
    record = (b'{"a": 1, "b": 2, "c": ' + long_number + b"}" if where == "ignored"
              else b'{"a": ' + long_number + b', "b": 2}')
    decoder = RecordDecoder(["a", "b"])
    try:
        alone = [decoder.decode(record)]
    except ValueError as error:
        alone = str(error)
    for batch in ([record], [b'{"a": 0, "b": 0}', record]):
        decoded = decoder.decode_batch(batch)
        if isinstance(alone, str):
            assert decoded.errors == [(len(batch) - 1, alone)]
        else:
            np.testing.assert_array_equal(decoded.values[-1], alone[0])
    assert isinstance(alone, str) == (digits > 4300)  # the boundary this test is about


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a\tb"])
def test_field_names_json_must_escape_still_make_a_decoder(name):
    """A field name with a quote, a backslash or a control character (msgspec cannot rename to it) still
    decodes, record by record, as pydantic reads it."""
    decoder = RecordDecoder([name], model_key="site")
    value = b'{%s: 1.5, "site": "x"}' % json.dumps(name).encode()
    decoded = decoder.decode_batch([value])
    assert decoded.good == [0] and decoded.keys == ["x"]
    np.testing.assert_array_equal(decoded.values, [[1.5]])


def test_an_integer_too_large_for_a_float_is_a_bad_record_not_a_crash():
    decoded = RecordDecoder(["a", "b"]).decode_batch([b'{"a": 1, "b": 2}', BAD[-1]])
    assert decoded.good == [0]
    assert decoded.errors == [(1, "field 'a' is not finite (too large for a float)")]


def test_model_keys_come_back_beside_the_numbers():
    decoder = RecordDecoder(["a"], target="y", model_key="site")
    decoded = decoder.decode_batch([b'{"a": 1, "y": 2.5, "site": "north"}', b'{"a": 3, "y": 4, "site": 7}'])
    assert decoded.keys == ["north", 7]
    np.testing.assert_array_equal(decoded.values, [[1.0, 2.5], [3.0, 4.0]])
    assert decoder.decode_batch([b'{"a": 1, "y": 2, "site": 1.5}']).errors[0][1].startswith("field 'site'")


def test_assignment_records_hold_every_field_as_json():
    records = [
        InputRecord('in"put', 3, 41, None, b"{}"),
        InputRecord('in"put', 3, 42, "clé".encode(), b"{}"),
        InputRecord('in"put', 4, 7, b"\xff\x00", b"{}"),
    ]
    resp = np.array([[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]])
    log_likelihood = np.array([-1.5, float("nan"), 1e-300])
    outputs = assignments(records, "out", resp, log_likelihood, 100, np.array([1.0, 2.0, -3.5]), 'k"%s')
    bodies = [json.loads(o.value) for o in outputs]
    assert [o.topic for o in outputs] == ["out"] * 3
    assert [o.key for o in outputs] == [r.key for r in records]
    assert bodies[0] == {
        "source": {"topic": 'in"put', "partition": 3, "offset": 41},
        "key": None,
        "component": 1,
        "probabilities": [0.25, 0.75],
        "log_likelihood": -1.5,
        "n_seen": 100,
        "prediction": 1.0,
        "model_key": 'k"%s',
    }
    assert bodies[1]["key"] == "clé" and bodies[1]["log_likelihood"] is None  # NaN is not JSON: null
    assert bodies[2]["key"] == base64.b64encode(b"\xff\x00").decode()
    assert bodies[2]["log_likelihood"] == 1e-300 and bodies[2]["n_seen"] == 102
    assert [b["component"] for b in bodies] == [1, 0, 0]


@pytest.mark.parametrize("k", [1, 3])
def test_assignment_numbers_round_trip_exactly(k):
    rng = np.random.default_rng(k)
    resp = rng.dirichlet(np.ones(k), size=50)
    log_likelihood = rng.normal(scale=1e3, size=50)
    records = [InputRecord("t", 0, i, None, b"{}") for i in range(50)]
    bodies = [json.loads(o.value) for o in assignments(records, "out", resp, log_likelihood, 0)]
    assert np.array_equal([b["probabilities"] for b in bodies], resp)
    assert np.array_equal([b["log_likelihood"] for b in bodies], log_likelihood)
    assert all("prediction" not in b and "model_key" not in b for b in bodies)
    assert not any(math.isnan(p) for b in bodies for p in b["probabilities"])


@st.composite
def answered_batches(draw):
    """Records of any topic, partition, offset and key, answered by any numbers (NaN and infinities too)."""
    n, k = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    topics = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=2))  # text: NULs too
    records = [
        InputRecord(
            draw(st.sampled_from(topics)),
            draw(st.integers(0, 3)),
            draw(st.integers(0, 2**63 - 1)),
            draw(st.one_of(st.none(), st.binary(max_size=12), st.text(max_size=6).map(str.encode))),
            b"{}",
        )
        for _ in range(n)
    ]
    number = st.floats(width=64)
    resp = np.array(draw(st.lists(st.lists(number, min_size=k, max_size=k), min_size=n, max_size=n)))
    log_likelihood = np.array(draw(st.lists(number, min_size=n, max_size=n)))
    predictions = draw(st.one_of(st.none(), st.lists(number, min_size=n, max_size=n).map(np.array)))
    # one model key for all, or one per record (several keys' models answered together); likewise n_seen
    model_key = draw(st.one_of(st.none(), st.text(max_size=8), st.lists(st.text(max_size=8), min_size=n, max_size=n)))
    n_seen = draw(st.one_of(st.integers(0, 2**62), st.lists(st.integers(0, 2**62), min_size=n, max_size=n)))
    return records, resp, log_likelihood, n_seen, predictions, model_key


@settings(max_examples=300, deadline=None)
@given(answered_batches())
def test_assignment_bytes_are_those_of_a_dict_per_record(batch):
    """The assembled records are byte for byte what orjson makes of a dict per record (the fields in their
    documented order), whatever the topic, keys and numbers."""
    import orjson

    records, resp, log_likelihood, n_seen, predictions, model_key = batch
    outputs = assignments(records, "out", resp, log_likelihood, n_seen, predictions, model_key)
    for j, (record, output) in enumerate(zip(records, outputs, strict=True)):
        key = record.key
        if key is not None:
            try:
                key = key.decode("utf-8")
            except UnicodeDecodeError:
                key = base64.b64encode(key).decode("ascii")
        body = {
            "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
            "key": key,
            "component": int(np.argmax(resp[j])),
            "probabilities": resp[j].tolist(),
            "log_likelihood": float(log_likelihood[j]),
            "n_seen": n_seen + j if isinstance(n_seen, int) else n_seen[j],
        }
        if predictions is not None:
            body["prediction"] = float(predictions[j])
        if model_key is not None:
            body["model_key"] = model_key if isinstance(model_key, str) else model_key[j]
        assert output.value == orjson.dumps(body), j
        assert output.key == record.key and output.topic == "out"


def test_a_poll_batch_splits_into_batches_of_at_most_a_size_in_order():
    """`InputBatch.split`: consecutive batches of at most `size` records, every column cut alike; an empty
    batch splits into none, a small one into itself."""
    from streamem_connectors.kafka.records import InputBatch

    batch = InputBatch("in", [0, 1, 0, 1, 1], [10, 20, 11, 21, 22], [b"a", None, b"c", b"d", None],
                       [b"1", b"2", b"3", b"4", b"5"])
    parts = batch.split(2)
    assert [part.size for part in parts] == [2, 2, 1]
    for column in ("partitions", "offsets", "keys", "values"):
        assert sum((getattr(part, column) for part in parts), []) == getattr(batch, column)
    assert all(part.topic == "in" and part.decoded is None for part in parts)
    assert batch.split(5) == [batch] and InputBatch("in", [], [], [], []).split(3) == []


@settings(max_examples=200, deadline=None)
@given(answered_batches())
def test_a_batch_answered_through_its_record_view_gives_the_same_records(batch):
    """The model process answers a poll through `InputBatch.records_view()` (records made only when asked for,
    the assignments built from the columns): the same bytes as from the batch's `InputRecord`s, and the view
    is the sequence of those records."""
    from streamem_connectors.kafka.records import InputBatch

    records, resp, log_likelihood, n_seen, predictions, model_key = batch
    topic = records[0].topic  # a poll batch has one topic
    polled = InputBatch(topic, [r.partition for r in records], [r.offset for r in records],
                        [r.key for r in records], [b'{"v": %d}' % i for i in range(len(records))])
    view = polled.records_view()
    assert len(view) == len(records) and list(view) == polled.records()
    assert view[-1] == polled.records()[-1] and view[1:3] == polled.records()[1:3]
    expected = assignments(polled.records(), "out", resp, log_likelihood, n_seen, predictions, model_key)
    assert assignments(view, "out", resp, log_likelihood, n_seen, predictions, model_key) == expected
