"""Outputs that always fit and a consumer that rides out broker outages.

Dead letters are bounded (a payload prefix with its size, hash and a truncation flag), model keys
have a length limit, and the sink retries through an outage up to `delivery_timeout_s`, with
/readyz saying 503 while outputs wait (and /healthz 200: a liveness probe must not restart the pod),
and a clean one-line exit when the limit passes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import threading

import pytest
from kafka import KafkaProducer

from streamem_connectors.kafka import records as schemas
from streamem_connectors.kafka.broker import EmbeddedBroker
from streamem_connectors.kafka.checkpoint import Checkpoint, TopicStore
from streamem_connectors.kafka.clients import DeliveryFailed, make_sink
from streamem_connectors.kafka.observability import Observability
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.records import InputRecord, OutputRecord, RecordDecoder, dead_letter
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import TopicCounter, produce, read_all, unique, wait_for
from tests.test_kafka_consumer import _start, good_values, make_settings
from tests.test_observability import _get, _metric

MAX_REQUEST = 1024 * 1024  # the producers' max_request_size (kafka-python) / message.max.bytes default

# Payloads whose dead letter grows most: JSON escapes control bytes 6x (\u0001), base64 is 4/3x,
# a 4-byte UTF-8 character stays 4 bytes; each far beyond what a dead letter may carry.
WORST_PAYLOADS = {
    "control bytes": b"\x01" * 200_000,
    "non-UTF-8": b"\xff" * 800_000,
    "non-JSON text": b"x" * MAX_REQUEST,
    "4-byte characters": "\U0001f600".encode() * 300_000,
    "quotes": b'"' * 900_000,
}


def _produce_big(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None] | None = None) -> None:
    """Produce with a request limit above 1 MiB (the test helper's producer keeps the default)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 * MAX_REQUEST, linger_ms=5)
    keys = keys or [None] * len(values)
    futures = [producer.send(topic, key=key, value=value) for key, value in zip(keys, values, strict=True)]
    producer.flush()
    producer.close()
    assert all(f.succeeded() for f in futures), "the broker did not take every test record"


def _source(value: bytes | None, key: bytes | None = None) -> InputRecord:
    return InputRecord("t" * 249, 0, 7, key, value)  # 249: Kafka's longest topic name


@pytest.mark.parametrize("name", sorted(WORST_PAYLOADS))
def test_a_huge_payload_gives_a_dead_letter_far_below_the_request_limit(name):
    """A dead letter keeps a bounded prefix, the payload's size and sha256, and says it was cut."""
    payload = WORST_PAYLOADS[name]
    huge_key = b"\x02" * 500_000
    huge_error = "field 'a' is not a number: " + "\x03" * 500_000
    out = dead_letter(_source(payload, huge_key), "dead", huge_error)
    size = len(out.value) + len(out.key or b"")
    assert size < MAX_REQUEST // 2, f"{name}: {size} bytes"
    body = json.loads(out.value)
    assert body["size"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()
    assert body["truncated"] is True and body["key_truncated"] is True
    kept = base64.b64decode(body["value"]) if body["encoding"] == "base64" else body["value"].encode()
    assert payload.startswith(kept) and 0 < len(kept) <= schemas.DEAD_LETTER_VALUE_BYTES
    assert huge_key.startswith(out.key) and len(out.key) <= schemas.DEAD_LETTER_KEY_BYTES
    assert body["error"].startswith("field 'a' is not a number: ") and len(body["error"]) < 5000
    assert "500027 characters" in body["error"]


def test_a_cut_never_splits_a_utf8_character_and_a_small_payload_is_kept_whole():
    """The UTF-8 prefix ends on a character boundary; a payload under the limit is unchanged."""
    payload = b"a" + "é".encode() * schemas.DEAD_LETTER_VALUE_BYTES  # the limit falls inside a character
    body = json.loads(dead_letter(_source(payload), "dead", "not valid JSON").value)
    assert body["encoding"] == "utf-8" and body["truncated"] is True
    assert payload.startswith(body["value"].encode())
    assert len(body["value"].encode()) in (schemas.DEAD_LETTER_VALUE_BYTES, schemas.DEAD_LETTER_VALUE_BYTES - 1)
    small = json.loads(dead_letter(_source(b"oops", b"k"), "dead", "not valid JSON").value)
    assert small == {
        "source": {"topic": "t" * 249, "partition": 0, "offset": 7},
        "key": "k",
        "error": "not valid JSON",
        "value": "oops",
        "encoding": "utf-8",
        "size": 4,
        "sha256": hashlib.sha256(b"oops").hexdigest(),
        "truncated": False,
        "key_truncated": False,
    }
    tombstone = json.loads(dead_letter(_source(None), "dead", "empty message (no JSON value)").value)
    assert tombstone["value"] is None and tombstone["size"] is None and tombstone["truncated"] is False


def test_an_absurd_model_key_is_a_bad_record():
    """A model key longer than the limit (a string, or an integer's digits) is dead-lettered, by name."""
    decoder = RecordDecoder(["a"], model_key="site")
    limit = schemas.MODEL_KEY_CHARACTERS
    values = [
        json.dumps({"a": 1, "site": "s" * limit}).encode(),
        json.dumps({"a": 1, "site": "s" * 500_000}).encode(),
        b'{"a": 1, "site": -1' + b"0" * 999 + b"}",  # an integer key: its digits count
    ]
    decoded = decoder.decode_batch(values)
    assert decoded.good == [0] and decoded.keys == ["s" * limit]
    assert decoded.errors == [
        (1, f"field 'site' is too long for a model key (500000 characters, limit {limit})"),
        (2, f"field 'site' is too long for a model key (1001 characters, limit {limit})"),
    ]


def test_a_message_key_too_long_to_answer_is_a_bad_record():
    """A message key over the limit would make an assignment (key + its JSON) too large: dead-lettered."""
    limit = schemas.MESSAGE_KEY_BYTES
    values = [b'{"a": 1}'] * 3
    decoded = RecordDecoder(["a"]).decode_batch(values, [None, b"k" * limit, b"\x01" * 600_000])
    assert decoded.good == [0, 1]
    assert decoded.errors == [(2, f"message key too long (600000 bytes, limit {limit})")]


def test_a_consumer_dead_letters_a_record_with_a_huge_key_and_goes_on(broker, tmp_path):
    """A valid record whose key is 600 KB: dead-lettered, not an assignment too large to send (was: stuck)."""
    topic = unique("hugekey")
    settings = make_settings(broker, topic, max_records=21, checkpoint_dir=tmp_path, warmup=5, batch_size=5)
    ensure_topics(settings, input_partitions=1)
    good = good_values(21)
    _produce_big(broker.bootstrap_servers, topic, good, keys=[None] * 10 + [b"\x01" * 600_000] + [None] * 10)
    counters = run_consumer(settings)
    assert (counters.assigned, counters.dead_lettered) == (20, 1)
    (dead,) = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    assert dead["error"] == f"message key too long (600000 bytes, limit {schemas.MESSAGE_KEY_BYTES})"
    assert dead["key_truncated"] is True and dead["value"] == good[10].decode()


def test_the_error_of_a_huge_string_field_is_short():
    """The error naming a bad field shows a bounded excerpt of the value, not all of it."""
    error = RecordDecoder(["a"]).decode_batch([json.dumps({"a": "x" * 500_000}).encode()]).errors[0][1]
    assert error.startswith("field 'a' is not a number: \"xxx") and len(error) < 300


@pytest.mark.parametrize(
    "payload", [b"\x01" * 200_000, b"\xff" * 800_000, b"x" * MAX_REQUEST], ids=["control", "binary", "text"]
)
def test_a_consumer_dead_letters_a_huge_record_and_goes_on(broker, tmp_path, payload):
    """Ten good records, a huge bad one, ten good: 20 assignments, one dead letter, exit clean (was: stuck)."""
    topic = unique("huge")
    settings = make_settings(broker, topic, max_records=21, checkpoint_dir=tmp_path, warmup=5, batch_size=5)
    ensure_topics(settings, input_partitions=1)
    good = good_values(20)
    _produce_big(broker.bootstrap_servers, topic, good[:10] + [payload] + good[10:])
    counters = run_consumer(settings)
    assert (counters.assigned, counters.dead_lettered) == (20, 1)
    (dead,) = read_all(broker.bootstrap_servers, settings.topics["dead_letter"])
    assert dead["source"]["offset"] == 10 and dead["size"] == len(payload) and dead["truncated"] is True
    assert dead["sha256"] == hashlib.sha256(payload).hexdigest()


# -- broker outages ------------------------------------------------------------------------------
def _readyz(port: int) -> tuple[int, str]:
    """One probe of /readyz, a fifth of a second after the previous one (a kubelet probes every few seconds)."""
    threading.Event().wait(0.2)
    return _get(port, "/readyz")


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_an_outage_is_ridden_out_with_readyz_503_meanwhile(client):
    """A checkpoint that meets a stopped broker waits (/readyz 503, the wait metric grows, /healthz stays 200 so
    no liveness probe restarts it) and is delivered once the broker is back on its port: no error."""
    outage = EmbeddedBroker().start()  # its own broker: this test stops it
    observability = Observability(delivery_stall_s=1.0, delivery_timeout_s=60)
    port = observability.serve(0, host="127.0.0.1")
    try:
        topic = unique("outage")
        settings = make_settings(outage, topic, client=client, delivery_timeout_s=60)  # checkpoints in a topic
        ensure_topics(settings, input_partitions=1)
        produce(outage.bootstrap_servers, topic, good_values(300))
        stop, result = threading.Event(), {}

        def consume():
            try:
                result["counters"] = run_consumer(settings, stop=stop, observability=observability)
            except BaseException as error:  # noqa: BLE001 - the test asserts there is none
                result["error"] = error

        thread = threading.Thread(target=consume, name="consumer")
        thread.start()
        counter = TopicCounter(outage.bootstrap_servers, settings.topics["assignments"])
        try:
            wait_for(lambda: counter.count() >= 300, 60, "300 assignments")
        finally:
            counter.close()
        outage.stop()
        stop.set()  # the last checkpoint now waits for the broker
        status, text = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(_readyz(port)), 30, "/readyz 503")
        assert text.startswith("outputs not acknowledged for")
        assert _metric(_get(port, "/metrics")[1], "streamem_delivery_wait_seconds") >= 1.0
        assert _get(port, "/healthz") == (200, "ok\n")  # riding it out: not a reason to restart
        outage = EmbeddedBroker(port=outage.port).start()  # back, empty, on the same port
        thread.join(90)
        assert not thread.is_alive() and "error" not in result, result.get("error")
        assert _get(port, "/healthz") == (200, "ok\n")
        stored = Checkpoint.parse(TopicStore(settings, sink=None).load(settings.checkpoint_key))
        assert stored.model["n_seen"] == 300  # the checkpoint reached the broker after the outage
        assert [(o.partition, o.offset) for o in stored.offsets] == [(0, 300)]
    finally:
        outage.stop()
        observability.close()


def test_an_outage_beyond_the_limit_stops_with_one_clear_line():
    """Past --delivery-timeout-s the consumer exits 1 with one 'stopped:' line and no traceback."""
    outage = EmbeddedBroker().start()
    process = None
    try:
        topic = unique("gone")
        settings = make_settings(outage, topic)
        ensure_topics(settings, input_partitions=1)
        produce(outage.bootstrap_servers, topic, good_values(300))
        process = _start(settings, "--delivery-timeout-s", "3", "--log-level", "WARNING")
        counter = TopicCounter(outage.bootstrap_servers, settings.topics["assignments"])
        try:
            wait_for(lambda: counter.count() >= 300, 60, "300 assignments")
        finally:
            counter.close()
        outage.stop()
        process.send_signal(signal.SIGTERM)  # its last checkpoint meets the stopped broker
        _, errors = process.communicate(timeout=60)
        assert process.returncode == 1, errors[-3000:]
        assert "Traceback" not in errors, errors[-3000:]
        lines = errors.splitlines()
        stopped = [line for line in lines if "stopped:" in line]
        assert len(stopped) == 1 and stopped[0] == lines[-1], errors[-3000:]
        assert "output records not acknowledged within delivery_timeout_s=3 s" in stopped[0]
        assert len(lines) < 40, errors[-3000:]  # the clients' reconnect chatter is throttled
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        outage.stop()


def test_readyz_fails_while_a_checkpoint_waits_longer_than_delivery_stall_s():
    """/readyz is 503 (and says why) while outputs wait past delivery_stall_s, 200 once delivered; /healthz 200."""
    observability = Observability(delivery_stall_s=0.0)
    port = observability.serve(0, host="127.0.0.1")
    try:
        observability.ready()
        with observability.delivering():
            status, text = _get(port, "/readyz")
            assert status == 503 and text.startswith("outputs not acknowledged for")
            assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz") == (200, "ready\n")
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _metric(_get(port, "/metrics")[1], "streamem_delivery_wait_seconds") == 0.0
    finally:
        observability.close()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_record_no_retry_can_send_fails_at_once_in_one_line(broker, client):
    """An output over the producer's request limit raises DeliveryFailed at once (no retries until the limit)."""
    settings = make_settings(broker, unique("toolarge"), client=client, delivery_timeout_s=300)
    sink = make_sink(settings)
    try:
        with pytest.raises(DeliveryFailed, match="an output record cannot be sent: .*") as failed:
            sink.send([OutputRecord(settings.topics["assignments"], None, b"x" * (2 * MAX_REQUEST))])
            sink.flush()
        assert "\n" not in str(failed.value)
    finally:
        sink.close()


@pytest.mark.parametrize("delivery_timeout_s", [300.0, 1800.0])
def test_the_group_keeps_a_consumer_through_the_longest_delivery_wait(broker, delivery_timeout_s):
    """The consumer's max poll interval is longer than a checkpoint can block riding out an outage (two
    deliveries of delivery_timeout_s each, then a margin): the group does not evict it mid ride-out."""
    from streamem_connectors.kafka.clients import ConfluentSource, KafkaPythonSource, max_poll_interval_ms

    settings = make_settings(broker, unique("poll"), delivery_timeout_s=delivery_timeout_s)
    source = KafkaPythonSource(settings, start_offsets=lambda partitions: {})
    try:
        interval_ms = source._consumer.config["max_poll_interval_ms"]
    finally:
        source.close()
    assert interval_ms == max_poll_interval_ms(settings) > 2 * delivery_timeout_s * 1000 + 30_000
    ConfluentSource(settings, start_offsets=lambda partitions: {}).close()  # librdkafka takes the same value


@pytest.mark.parametrize("delivery_timeout_s", [300.0, 1800.0])
def test_liveness_outlasts_the_longest_delivery_wait(delivery_timeout_s):
    """/healthz holds for as long as the group keeps the consumer minus a margin, and longer than two ride-outs."""
    from streamem_connectors.kafka.clients import longest_checkpoint_s

    limit_s = Observability(delivery_timeout_s=delivery_timeout_s).delivery_limit_s
    assert limit_s == longest_checkpoint_s(delivery_timeout_s) > 2 * delivery_timeout_s


def test_a_record_the_broker_rejects_for_good_fails_at_once_in_one_line(broker):
    """A rejection in a delivery report (confluent: the broker's INVALID_TOPIC for a topic name it refuses) is
    not retried until delivery_timeout_s: DeliveryFailed at once, in one line naming the broker's error."""
    import time

    settings = make_settings(broker, unique("rejected"), client="confluent", delivery_timeout_s=30)
    sink = make_sink(settings)
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryFailed, match="an output record cannot be sent: .*Invalid topic") as failed:
            sink.send([OutputRecord("bad topic!", None, b"{}")])
            sink.flush()
        assert "\n" not in str(failed.value)
        assert time.monotonic() - started < 15  # one attempt, not 30 s of retries
    finally:
        sink.close()


def _kafka_python_errors(codes):
    from kafka.errors import for_code

    return [for_code(code)("the broker said no") for code in codes]


def _confluent_errors(codes):
    from confluent_kafka import KafkaError, KafkaException

    return [KafkaError(code) for code in codes] + [KafkaException(KafkaError(code)) for code in codes]


# Kafka protocol error codes: the same numbers in both clients' error objects
REJECTED_FOR_GOOD = {
    10: "MESSAGE_TOO_LARGE (the topic's max.message.bytes)",
    17: "INVALID_TOPIC_EXCEPTION",
    18: "RECORD_LIST_TOO_LARGE",
    29: "TOPIC_AUTHORIZATION_FAILED",
    31: "CLUSTER_AUTHORIZATION_FAILED",
    87: "INVALID_RECORD",
}
PASSING = {3: "UNKNOWN_TOPIC_OR_PARTITION", 6: "NOT_LEADER_OR_FOLLOWER", 7: "REQUEST_TIMED_OUT", 15: "COORDINATOR"}


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_broker_rejections_are_fatal_and_outages_are_not(client):
    """Real client error objects: what the broker refuses for good is fatal (no retry can send it), what an outage
    gives (timeouts, transport errors, leaders moving) is retried."""
    from confluent_kafka import KafkaError
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    from streamem_connectors.kafka.clients import rejected_for_good

    if client == "kafka-python":
        fatal = _kafka_python_errors(REJECTED_FOR_GOOD)
        passing = _kafka_python_errors(PASSING) + [KafkaTimeoutError("expired"), KafkaConnectionError("refused")]
    else:
        fatal = _confluent_errors(REJECTED_FOR_GOOD)
        passing = _confluent_errors(PASSING) + _confluent_errors([KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT])
        passing.append("flush timed out")
    assert [error for error in fatal if not rejected_for_good(error)] == []
    assert [error for error in passing if rejected_for_good(error)] == []


def test_long_text_is_cut_one_way_everywhere():
    """Errors, dead letters, delivery failures and demo samples are cut by one helper: at most `limit`
    characters, ending in '… (N characters)' with N the whole length; short text is kept whole."""
    from streamem_connectors.kafka import clients, demo
    from streamem_connectors.kafka.text import shorten

    assert shorten("abc", 3) == "abc"
    cut = shorten("x" * 1000, 50)
    assert len(cut) == 50 and cut.endswith("… (1000 characters)") and cut.startswith("x" * 30)
    error = dead_letter(_source(b"{}"), "dead", "e" * 10_000)
    assert json.loads(error.value)["error"] == shorten("e" * 10_000, schemas.DEAD_LETTER_ERROR_CHARACTERS)
    decoded = RecordDecoder(["a"]).decode_batch([json.dumps({"a": "x" * 500}).encode()]).errors[0][1]
    assert decoded.endswith("… (502 characters)"), decoded
    assert clients._one_line("y" * 1000) == shorten("y" * 1000, 300)
    sample = demo._shorten(json.dumps({"v": "z" * 1000}))
    assert len(sample) <= 400 and sample.endswith(" characters)"), sample
