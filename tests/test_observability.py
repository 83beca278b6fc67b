"""Metrics, health endpoints and JSON log lines of a real consumer run."""

from __future__ import annotations

import io
import json
import logging
import sys
import urllib.request
from types import SimpleNamespace

from streamem_connectors.kafka import observability as observability_module
from streamem_connectors.kafka.observability import JsonFormatter, Observability
from streamem_connectors.kafka.pipeline import run_consumer
from streamem_connectors.kafka.topics import ensure_topics
from tests.kafka_helpers import produce, unique
from tests.test_kafka_consumer import good_values, make_settings


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics_health_and_json_logs_of_a_run(broker):
    """/metrics counts what the run did; /healthz and /readyz answer; dead letters log JSON with their source."""
    topic = unique("observed")
    settings = make_settings(broker, topic, max_records=803)
    ensure_topics(settings, input_partitions=1)
    produce(broker.bootstrap_servers, topic, good_values(800) + [b"oops", b"{}", b'{"a": "x", "b": 1}'])
    observability = Observability()
    port = observability.serve(0, host="127.0.0.1")
    assert _get(port, "/readyz")[0] == 503  # no partitions yet
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("streamem_connectors").addHandler(handler)
    try:
        run_consumer(settings, observability=observability)
        status, text = _get(port, "/metrics")
        assert status == 200
        assert _metric(text, "streamem_records_in_total") == 803
        assert _metric(text, "streamem_records_assigned_total") == 800
        assert _metric(text, "streamem_records_dead_lettered_total") == 3
        assert 'streamem_mixture_weight{component="0"}' in text
        assert "streamem_batch_latency_seconds_count" in text
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz") == (200, "ready\n")
        assert _get(port, "/nope")[0] == 404
    finally:
        logging.getLogger("streamem_connectors").removeHandler(handler)
        observability.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    dead = [line for line in lines if line["message"].startswith("dead-lettered")]
    assert len(dead) == 3
    assert dead[0]["source"] == {"topic": topic, "partition": 0, "offset": 800}
    assert dead[0]["level"] == "WARNING" and "not valid JSON" in dead[0]["error"]


class FakeClock:
    """The observability module's monotonic clock, moved by hand: the probe thresholds are tested at their
    edges, whatever the machine's load (the HTTP answers still go through the real server)."""

    def __init__(self, monkeypatch) -> None:
        self.now = 1024.0  # steps below are binary fractions, so the edges are exact
        monkeypatch.setattr(observability_module, "time", SimpleNamespace(monotonic=lambda: self.now))

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_liveness_fails_when_the_loop_stalls(monkeypatch):
    """/healthz is ok while the loop turned within stall_after_s, turns 503 once it has not, and recovers on a
    turn; /readyz follows it."""
    clock = FakeClock(monkeypatch)
    observability = Observability(stall_after_s=1.0)
    port = observability.serve(0, host="127.0.0.1")
    try:
        observability.ready()
        observability.turned()
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz") == (200, "ready\n")
        clock.advance(0.75)
        assert _get(port, "/healthz") == (200, "ok\n")
        clock.advance(0.25)
        assert _get(port, "/healthz") == (503, "stalled\n")
        assert _get(port, "/readyz") == (503, "not ready\n")
        observability.turned()
        assert _get(port, "/healthz") == (200, "ok\n")
        assert _get(port, "/readyz") == (200, "ready\n")
    finally:
        observability.close()


def test_a_delivery_wait_fails_readiness_but_not_liveness_within_the_limit(monkeypatch):
    """While a checkpoint waits for the broker (within delivery_timeout_s), /readyz is 503 and says why, and
    /healthz stays 200 although the loop does not turn meanwhile: a kubelet must not restart a pod riding out
    an outage."""
    clock = FakeClock(monkeypatch)
    observability = Observability(stall_after_s=0.2, delivery_stall_s=0.1, delivery_timeout_s=300.0)
    port = observability.serve(0, host="127.0.0.1")
    try:
        observability.ready()
        observability.turned()
        with observability.delivering():
            clock.advance(0.0625)
            assert _get(port, "/readyz") == (200, "ready\n")  # within one attempt: still delivering
            clock.advance(0.5)
            status, text = _get(port, "/readyz")
            assert status == 503 and text.startswith("outputs not acknowledged for"), text
            assert _get(port, "/healthz") == (200, "ok\n")  # 0.5625 s without a turn, past stall_after_s
            assert _metric(_get(port, "/metrics")[1], "streamem_delivery_wait_seconds") == 0.5625
        observability.turned()
        assert _get(port, "/readyz") == (200, "ready\n")
        assert _metric(_get(port, "/metrics")[1], "streamem_delivery_wait_seconds") == 0.0
    finally:
        observability.close()


def test_liveness_fails_once_a_delivery_wait_passes_the_limit(monkeypatch):
    """/healthz turns 503 only when a checkpoint has waited past delivery_limit_s (the sink gives up before:
    waiting longer means the process is stuck)."""
    clock = FakeClock(monkeypatch)
    observability = Observability(stall_after_s=0.1, delivery_stall_s=0.1, delivery_limit_s=0.75)
    port = observability.serve(0, host="127.0.0.1")
    try:
        observability.ready()
        with observability.delivering():
            clock.advance(0.5)
            assert _get(port, "/healthz") == (200, "ok\n")
            clock.advance(0.25)
            status, text = _get(port, "/healthz")
            assert status == 503 and "longer than an outage is ridden out" in text, text
    finally:
        observability.close()


def test_the_delivery_thresholds_come_from_the_sink():
    """/readyz's delivery threshold is the sink's attempt length (one constant, not two); /healthz's is at least
    two full ride-outs (the outputs, then the checkpoint record), each delivery_timeout_s plus a last attempt."""
    from streamem_connectors.kafka.clients import ATTEMPT_S

    assert Observability().delivery_stall_s == ATTEMPT_S
    assert Observability(delivery_timeout_s=4.0).delivery_stall_s == 4.0  # an attempt never outlasts the limit
    for timeout_s in (3.0, 300.0, 1800.0):
        limit_s = Observability(delivery_timeout_s=timeout_s).delivery_limit_s
        assert limit_s >= 2 * (timeout_s + min(ATTEMPT_S, timeout_s))


def test_a_kafka_clients_traceback_becomes_one_line_below_debug():
    """A client library's error with a traceback (a socket reset while the broker goes away) is logged as one
    line naming the exception; with --log-level DEBUG the traceback stays."""
    from streamem_connectors.kafka.observability import ClientLogThrottle

    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        import sys

        exc_info = sys.exc_info()
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    lines = {}
    for tracebacks in (False, True):
        message = "Error receiving network data closing socket"
        record = logging.LogRecord("kafka.net.transport", logging.ERROR, __file__, 1, message, (), exc_info)
        assert ClientLogThrottle(tracebacks=tracebacks).filter(record)
        lines[tracebacks] = formatter.format(record)
    assert lines[False] == (
        "ERROR kafka.net.transport: Error receiving network data closing socket "
        "(ConnectionResetError: [Errno 104] Connection reset by peer)"
    )
    assert "Traceback (most recent call last)" in lines[True]


def test_the_model_process_sends_a_kafka_clients_traceback_as_one_line_and_its_own_in_full():
    """The model process's log records cross the pipe formatted: a Kafka client's traceback (a socket reset
    while the broker goes away) becomes one line, as in the consumer's own process, unless at DEBUG; a
    traceback of streamem's own code stays whole."""
    import multiprocessing

    from streamem_connectors.kafka.model_process import _pipe_handler

    for level, whole in ((logging.WARNING, False), (logging.DEBUG, True)):
        receiving, sending = multiprocessing.Pipe(duplex=False)
        handler = _pipe_handler(sending, level)
        for name in ("kafka.net.transport", "streamem_connectors.kafka.learner"):
            try:
                raise ConnectionResetError(104, "Connection reset by peer")
            except ConnectionResetError:
                record = logging.LogRecord(name, logging.ERROR, __file__, 1, "Error receiving data", None,
                                           exc_info=sys.exc_info())
            handler.handle(record)
            message = receiving.recv().getMessage()
            if name.startswith("kafka") and not whole:
                assert "Traceback" not in message and "ConnectionResetError" in message, message
            else:
                assert "Traceback" in message, message
