"""Operations: Prometheus metrics, liveness/readiness endpoints, and JSON log lines.

One small HTTP server (standard library) serves `/metrics` (Prometheus text
format, from prometheus-client), `/healthz` and `/readyz`. The two probes split
what a broker outage means:

- `/readyz` (readiness: "do not count on me now", for routing and alerts) is 503
  until the consumer holds partitions, while the loop is stalled, and while a
  checkpoint has waited more than one delivery attempt (`delivery_stall_s`) for
  the broker to acknowledge the outputs: outputs cannot be delivered.
- `/healthz` (liveness: "restart me") is 503 only when the process is stuck: the
  loop has not turned for `stall_after_s` outside a checkpoint, or a checkpoint
  has waited longer than it can while riding out an outage (`delivery_limit_s`,
  from `delivery_timeout_s`: the sink gives up then). A liveness probe on it
  never restarts a consumer riding out an outage.

`streamem_delivery_wait_seconds` says how long the current checkpoint has waited.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streamem_connectors.kafka.clients import ATTEMPT_S, longest_checkpoint_s

__all__ = ["ClientLogThrottle", "JsonFormatter", "Observability", "configure_logging", "quiet_client_loggers"]


class Observability:
    """Metrics and health of one consumer process."""

    def __init__(
        self,
        stall_after_s: float = 60.0,
        delivery_stall_s: float | None = None,
        delivery_timeout_s: float = 300.0,
        delivery_limit_s: float | None = None,
    ):
        """Parameters
        ----------
        stall_after_s : the loop not turning this long (outside a checkpoint) means it is stuck.
        delivery_stall_s : a checkpoint waiting longer than this for acknowledgements means the outputs
            cannot be delivered (a broker outage): /readyz fails. Default: one delivery attempt of the
            sink (`clients.ATTEMPT_S`, or `delivery_timeout_s` if shorter, as the sink does).
        delivery_timeout_s : the sink's limit (the `delivery_timeout_s` setting).
        delivery_limit_s : /healthz fails when a checkpoint waits longer than this. Default: the longest
            a checkpoint blocks riding out an outage (`clients.longest_checkpoint_s`).
        """
        self.registry = CollectorRegistry()
        self.records_in = Counter("streamem_records_in", "input records consumed", registry=self.registry)
        self.assigned = Counter(
            "streamem_records_assigned", "records answered with an assignment", registry=self.registry
        )
        self.dead_lettered = Counter(
            "streamem_records_dead_lettered", "records sent to the dead-letter topic", registry=self.registry
        )
        self.drift_events = Counter("streamem_drift_events", "weight drifts detected", registry=self.registry)
        self.lag = Gauge("streamem_consumer_lag", "records behind the high watermark", registry=self.registry)
        self.weights = Gauge("streamem_mixture_weight", "current mixture weight", ["component"], registry=self.registry)
        self.latency = Histogram(
            "streamem_batch_latency_seconds",
            "seconds from a poll batch's arrival until the loop collects its answers",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.delivery_wait = Gauge(
            "streamem_delivery_wait_seconds",
            "how long the current checkpoint has waited for the broker to acknowledge outputs (0: none waiting)",
            registry=self.registry,
        )
        self.delivery_wait.set_function(self.delivery_wait_s)
        self.stall_after_s = stall_after_s
        if delivery_limit_s is None:
            delivery_limit_s = longest_checkpoint_s(delivery_timeout_s)
        self.delivery_limit_s = delivery_limit_s
        self.delivery_stall_s = min(ATTEMPT_S, delivery_timeout_s) if delivery_stall_s is None else delivery_stall_s
        self._delivering_since: float | None = None
        self._last_turn = time.monotonic()
        self._ready = False
        self._previous = (0, 0, 0, 0)
        self._server: ThreadingHTTPServer | None = None

    # -- fed by the consume loop ------------------------------------------------------------
    def turned(self) -> None:
        """The loop went round once (called every iteration, with or without records)."""
        self._last_turn = time.monotonic()

    @contextlib.contextmanager
    def delivering(self):
        """Around a checkpoint: flushing the outputs, storing the checkpoint, committing. It blocks
        while the broker is away: /readyz fails once it has blocked for `delivery_stall_s`, /healthz
        only past `delivery_limit_s`."""
        self._delivering_since = time.monotonic()
        try:
            yield
        finally:
            self._delivering_since = None
            self._last_turn = time.monotonic()  # the loop turns on from here: the wait was not a stall

    def ready(self, value: bool = True) -> None:
        self._ready = value

    def on_batch(self, progress) -> None:
        c = progress.counters
        now = (c.records_in, c.assigned, c.dead_lettered, c.drift_events)
        for metric, new, old in zip(
            (self.records_in, self.assigned, self.dead_lettered, self.drift_events), now, self._previous
        ):
            if new > old:
                metric.inc(new - old)
        self._previous = now
        self.latency.observe(progress.batch_latency_s)
        if progress.lag is not None:
            self.lag.set(progress.lag)
        for k, weight in enumerate(progress.weights):
            self.weights.labels(component=str(k)).set(weight)

    # -- served -------------------------------------------------------------------------------
    def delivery_wait_s(self) -> float:
        since = self._delivering_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def delivered(self) -> bool:
        """False while outputs wait longer than one attempt for the broker (as during an outage)."""
        return self._delivering_since is None or self.delivery_wait_s() < self.delivery_stall_s

    def health(self) -> str:
        """What /healthz (liveness) says: "ok", or why the process is stuck."""
        if self._delivering_since is not None:  # the loop waits for the broker, up to the sink's limit
            wait = self.delivery_wait_s()
            if wait < self.delivery_limit_s:
                return "ok"
            return f"outputs not acknowledged for {wait:.0f} s, longer than an outage is ridden out"
        return "ok" if time.monotonic() - self._last_turn < self.stall_after_s else "stalled"

    def readiness(self) -> str:
        """What /readyz says: "ready", or why not (outputs that cannot be delivered, first)."""
        if not self.delivered:
            return f"outputs not acknowledged for {self.delivery_wait_s():.0f} s"
        if self.health() != "ok":
            return "not ready"
        return "ready" if self._ready else "not ready"

    @property
    def alive(self) -> bool:
        return self.health() == "ok"

    @property
    def is_ready(self) -> bool:
        return self.readiness() == "ready"

    def serve(self, port: int, host: str = "0.0.0.0") -> int:  # noqa: S104 - a container's probe port
        """Start the HTTP server in a daemon thread; returns the bound port (0 picks a free one)."""
        observability = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path == "/metrics":
                    body, status, kind = generate_latest(observability.registry), 200, CONTENT_TYPE_LATEST
                elif self.path == "/healthz":
                    health = observability.health()
                    body, status, kind = f"{health}\n".encode(), (200 if health == "ok" else 503), "text/plain"
                elif self.path == "/readyz":
                    readiness = observability.readiness()
                    body, status = f"{readiness}\n".encode(), (200 if readiness == "ready" else 503)
                    kind = "text/plain"
                else:
                    body, status, kind = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds would flood the log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="streamem-http", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra={"source": ...}` fields."""

    fields = ("source", "error", "partitions")

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self.fields:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ClientLogThrottle(logging.Filter):
    """Lets through one line of each kind a minute from the Kafka clients' own loggers.

    While a broker is away they log every reconnect at ERROR, several lines a second, which
    buries the consumer's own lines (one warning per delivery attempt, one error if it gives up).
    """

    def __init__(self, every_s: float = 60.0, tracebacks: bool = False):
        super().__init__()
        self.every_s = every_s
        self.tracebacks = tracebacks
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record.name == name or record.name.startswith(name + ".") for name in CLIENT_LOGGERS):
            return True
        key, now = (record.name, str(record.msg)), time.monotonic()  # the message template: one kind of line
        if now - self._last.get(key, -float("inf")) < self.every_s:
            return False
        if len(self._last) > 1000:  # templates with details baked in: keep the table small
            self._last.clear()
        self._last[key] = now
        if record.exc_info and record.exc_info[1] is not None and not self.tracebacks:
            # a client's traceback (a socket reset while the broker goes away) is a dozen lines of its
            # insides: one line says it, the traceback is for --log-level DEBUG
            error = record.exc_info[1]
            record.msg = f"{record.msg} ({type(error).__name__}: {str(error).replace('%', '%%')})"
            record.exc_info = record.exc_text = None
        return True


def configure_logging(level: str, fmt: str) -> None:
    """Root logging: `fmt` is "json" (one object per line) or "text"; the Kafka clients' own lines
    are throttled (`ClientLogThrottle`)."""
    handler = logging.StreamHandler()
    numeric = level if isinstance(level, int) else logging.getLevelName(str(level).upper())
    handler.addFilter(ClientLogThrottle(tracebacks=numeric == logging.DEBUG))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
        logging.Formatter.converter = time.gmtime
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_client_loggers(root.level)


# The Kafka client libraries log every connection attempt and group step at INFO, and every refused
# connection at ERROR: dozens of lines that say nothing to a user. Only --log-level DEBUG shows them.
CLIENT_LOGGERS = ("kafka", "confluent_kafka")


def quiet_client_loggers(level: int) -> None:
    """The Kafka clients' own loggers at WARNING (above `level`), or at `level` when that is DEBUG."""
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
