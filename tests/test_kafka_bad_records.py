"""An operator's catalogue of odd records, through the real consumer: none stops it, none is lost.

Each entry is a payload (and sometimes a key) with what must become of it: a dead letter whose
reason contains the given text, or an ordinary assignment (odd but valid input). The count of
kinds here is the figure quoted in the README's guarantees.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import streamem as se
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import produce, read_all, unique
from tests.test_kafka_consumer import good_values, make_settings, offsets_of

ASSIGNED = None  # odd but valid: answered like any good record

# (name, key, value, reason the dead letter must give, or ASSIGNED)
CATALOGUE: list[tuple[str, bytes | None, bytes | None, str | None]] = [
    # first: text that is not ASCII, then (below) a message without a value in the same poll
    ("UTF-8 text in an ignored field", None, '{"a": 0.5, "b": 1.0, "city": "Zürich"}'.encode(), ASSIGNED),
    ("not JSON", None, b"not json", "not valid JSON"),
    ("empty", None, b"", "empty message"),
    ("tombstone (no value)", b"k", None, "empty message"),
    ("whitespace only", None, b"   \n\t ", "not valid JSON"),
    ("truncated object", None, b'{"a": 1.0, "b"', "not valid JSON"),
    ("truncated number", None, b'{"a": 1.0, "b": 2.', "not valid JSON"),
    ("trailing garbage", None, b'{"a": 1.0, "b": 2.0} x', "not valid JSON"),
    ("two objects", None, b'{"a": 1.0, "b": 2.0}{"a": 1.0, "b": 2.0}', "not valid JSON"),
    ("single quotes", None, b"{'a': 1.0, 'b': 2.0}", "not valid JSON"),
    ("comment", None, b'{"a": 1.0, /* x */ "b": 2.0}', "not valid JSON"),
    ("JSON array", None, b"[1, 2, 3]", "not a JSON object"),
    ("JSON string", None, b'"a string"', "not a JSON object"),
    ("JSON number", None, b"3.5", "not a JSON object"),
    ("JSON null", None, b"null", "not a JSON object"),
    ("JSON true", None, b"true", "not a JSON object"),
    ("empty object", None, b"{}", "field 'a' is missing"),
    ("missing field", None, b'{"a": 1.0}', "field 'b' is missing"),
    ("misspelt field", None, b'{"A": 1.0, "b": 2.0}', "field 'a' is missing"),
    ("number as string", None, b'{"a": "1.5", "b": 2.0}', "field 'a' is not a number"),
    ("exponent as string", None, b'{"a": "1e3", "b": 2.0}', "field 'a' is not a number"),
    ("boolean", None, b'{"a": true, "b": 2.0}', "field 'a' is not a number"),
    ("null value", None, b'{"a": null, "b": 2.0}', "field 'a' is not a number"),
    ("object value", None, b'{"a": {"x": 1}, "b": 2.0}', "field 'a' is not a number"),
    ("array value", None, b'{"a": [1.0], "b": 2.0}', "field 'a' is not a number"),
    ("NaN", None, b'{"a": NaN, "b": 2.0}', "not finite"),
    ("Infinity", None, b'{"a": Infinity, "b": 2.0}', "not finite"),
    ("-Infinity", None, b'{"a": 1.0, "b": -Infinity}', "not finite"),
    ("float overflow 1e400", None, b'{"a": 1e400, "b": 2.0}', "not finite"),
    ("400-digit integer", None, b'{"a": 1' + b"0" * 400 + b', "b": 2.0}', "not finite"),
    ("hex literal", None, b'{"a": 0x10, "b": 2.0}', "not valid JSON"),
    ("leading zeros", None, b'{"a": 007, "b": 2.0}', "not valid JSON"),
    ("non-UTF-8 bytes", None, b"\xff\xfe\x00", "not valid JSON"),
    ("NUL inside JSON", None, b'{"a": 1.0,\x00 "b": 2.0}', "not valid JSON"),
    ("4,301-digit number in an ignored field", None, b'{"a": 0.5, "b": 1.0, "n": ' + b"1" * 4301 + b"}",
     "not valid JSON"),
    ("deeply nested", None, b'{"a": 1.0, "b": 2.0, "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "not valid JSON"),
    ("200 KB of control bytes", None, b"\x01" * 200_000, "not valid JSON"),
    ("800 KB non-UTF-8", None, bytes(range(128, 256)) * 6_400, "not valid JSON"),
    ("1 MiB non-JSON", None, b"x" * (1024 * 1024 - 512), "not valid JSON"),
    ("900 KB of escapes in an error field", None, b'{"a": "' + b"\\u0001" * 150_000 + b'", "b": 2.0}', "not a number"),
    ("absurd outlier 1e300", None, b'{"a": 1e300, "b": 0}', "outlier"),
    ("overflowing square 1.34e154", None, b'{"a": 1.34e154, "b": 0}', "outlier"),
    ("outlier -1e300", None, b'{"a": 0, "b": -1e300}', "outlier"),
    ("outlier 2**65", None, b'{"a": 36893488147419103232, "b": 0}', "outlier"),
    ("outlier 1e6", None, b'{"a": 1000000.0, "b": 0}', "outlier"),
    # odd but valid: learned and answered like any other record
    ("underflow 1e-400", None, b'{"a": 1e-400, "b": 1.0}', ASSIGNED),
    ("subnormal", None, b'{"a": 5e-324, "b": 1.0}', ASSIGNED),
    ("negative zero", None, b'{"a": -0.0, "b": 1.0}', ASSIGNED),
    ("integers", None, b'{"a": 8, "b": 3}', ASSIGNED),
    ("unicode escape in a field name", None, b'{"\\u0061": 0.5, "b": 1.0}', ASSIGNED),
    ("lone surrogate in an ignored field", None, b'{"a": 0.5, "b": 1.0, "note": "\\ud800"}', "not valid JSON"),
    ("extra fields of 300 KB", None, b'{"a": 0.5, "b": 1.0, "pad": "' + b"p" * 300_000 + b'"}', ASSIGNED),
    ("duplicate field, last one good", None, b'{"a": "x", "a": 0.5, "b": 1.0}', ASSIGNED),
    ("UTF-8 key", "κλειδί".encode(), b'{"a": 0.5, "b": 1.0}', ASSIGNED),
    ("non-UTF-8 key", b"\xff\x00\xfe", b'{"a": 0.5, "b": 1.0}', ASSIGNED),
    ("300 KB key of control bytes", b"\x01" * 300_000, b'{"a": 0.5, "b": 1.0}', "message key too long"),
    ("bad value with a 300 KB key", b"\x02" * 300_000, b"\x01" * 300_000, "message key too long"),
    ("16 KiB key", b"k" * 16_384, b'{"a": 0.5, "b": 1.0}', ASSIGNED),
]


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_no_kind_of_odd_record_stops_the_consumer_or_is_lost(broker, client, tmp_path):
    """Every catalogued kind, between good records: each offset ends in one assignment or one dead
    letter with the expected reason, and the model ends where the good records alone put it."""
    topic = unique(f"odd-{client}")
    n_good = 1200
    values = good_values(n_good)
    keys: list[bytes | None] = [None] * n_good
    # after the warm-up, so outliers meet a model; one odd record every 13 good ones
    for position, (_, key, value, _) in zip(range(400, 10**9, 13), CATALOGUE):
        values.insert(position, value)
        keys.insert(position, key)
    settings = make_settings(
        broker, topic, max_records=len(values), client=client, checkpoint_dir=tmp_path / "checkpoints"
    )
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, values, keys=keys)

    counters = run_consumer(settings)

    assignments = read_all(broker.bootstrap_servers, settings.topics["assignments"])
    dead = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    every = offsets_of(assignments) + offsets_of(dead)
    assert len(every) == len(set(every)) == len(values) == counters.records_in
    reasons = {d["source"]["offset"]: d["error"] for d in dead}
    assigned = set(offsets_of(assignments))
    for offset, (name, _, _, reason) in zip(range(400, 10**9, 13), CATALOGUE):
        if reason is ASSIGNED:
            assert (0, offset) in assigned, f"{name}: not assigned; dead letter says {reasons.get(offset)!r}"
        else:
            assert offset in reasons, f"{name}: not dead-lettered"
            assert reason in reasons[offset], f"{name}: {reasons[offset][:200]!r}"
    assert counters.dead_lettered == sum(reason is not ASSIGNED for *_, reason in CATALOGUE)

    # the good records' two clusters, (0, 0) and (8, 3), are where the model ended up
    stored = json.loads((tmp_path / "checkpoints").joinpath(f"{settings.group_id}%2F0.json").read_text())
    means = se.OnlineGMM.from_dict(stored["model"]).means_
    means = means[np.argsort(means[:, 0])]
    np.testing.assert_allclose(means, [[0.0, 0.0], [8.0, 3.0]], atol=0.25)
