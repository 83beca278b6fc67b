"""The main job on a fresh machine: embedded broker, a regime-switching stream, the consumer, live progress."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from streamem_connectors.kafka.broker import EmbeddedBroker
from streamem_connectors.kafka.demo_regimes import run_regime_part
from streamem_connectors.kafka.pipeline import Progress, run_consumer
from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.text import shorten
from streamem_connectors.kafka.topics import ensure_topics, silent_client

__all__ = ["produce_regimes", "run_demo", "REGIMES"]

MEANS = np.array([[0.0, 0.0], [6.0, 1.0], [2.0, 7.0]])
SCALES = np.array([[1.0, 0.6], [0.8, 1.2], [1.0, 1.0]])
# mixture weights of the three components in each regime of the demo stream
REGIMES = [np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.3, 0.5]), np.array([0.45, 0.45, 0.1])]


def produce_regimes(bootstrap_servers: str, topic: str, n: int, bad: int, seed: int) -> list[int]:
    """Produce exactly n records {"x", "y"} whose weights switch regime every n / 3 records (the first
    regimes take the remainder), plus `bad` malformed ones; returns the change points (record counts)."""
    from kafka import KafkaProducer

    rng = np.random.default_rng(seed)
    sizes = [n // len(REGIMES) + (k < n % len(REGIMES)) for k in range(len(REGIMES))]
    labels = np.concatenate([rng.choice(3, size=size, p=w) for size, w in zip(sizes, REGIMES, strict=True)])
    points = MEANS[labels] + rng.normal(size=(len(labels), 2)) * SCALES[labels]
    payloads = [json.dumps({"x": round(x, 4), "y": round(y, 4), "source": "demo"}).encode() for x, y in points]
    malformed = [
        b"not json",
        b"[1, 2]",
        b'{"x": 1.0}',
        b'{"x": "fast", "y": 2}',
        b'{"x": NaN, "y": 1}',
        b"",
        b"\xff\xfe",
    ]
    for i, position in enumerate(sorted(rng.choice(len(payloads), size=bad, replace=False), reverse=True)):
        payloads.insert(int(position), malformed[i % len(malformed)])
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=20, batch_size=512 * 1024)
    futures = [producer.send(topic, key=f"sensor-{i % 8}".encode(), value=value) for i, value in enumerate(payloads)]
    producer.flush()
    failed = [f for f in futures if not f.succeeded()]
    producer.close()
    if failed:
        raise RuntimeError(f"{len(failed)} demo records were not acknowledged by the broker")
    return [int(c) for c in np.cumsum(sizes)[:-1]]


def run_demo(
    records: int = 90_000,
    bad_records: int = 25,
    client: str = "kafka-python",
    seed: int = 0,
    regime_records: int = 20_000,
) -> int:
    """The consumer on a regime-switching stream (drift in the mixture weights), then, with
    `regime_records` > 0, a stream of persistent regimes through a mixture and a hidden Markov model."""
    out = sys.stdout
    began = time.monotonic()
    print("streamem demo: starting the embedded Kafka-compatible broker (Tansu) ...", file=out, flush=True)
    with EmbeddedBroker() as broker:
        settings = ConsumerSettings(
            bootstrap_servers=broker.bootstrap_servers,
            input_topic="demo.events",
            features=["x", "y"],
            n_components=3,
            warmup=1000,
            batch_size=128,
            step_floor=0.02,
            max_records=records + bad_records,
            client=client,
            log_level="WARNING",
        )
        # one partition: regimes are a property of the stream's order, which Kafka keeps per partition
        ensure_topics(settings, input_partitions=1)
        print(
            f"broker on {broker.bootstrap_servers}; producing {records:,} records in {len(REGIMES)} regimes "
            f"(+{bad_records} malformed) to {settings.input_topic} ...",
            file=out,
            flush=True,
        )
        changes = produce_regimes(broker.bootstrap_servers, settings.input_topic, records, bad_records, seed)
        for k, weights in enumerate(REGIMES):
            start = 0 if k == 0 else changes[k - 1]
            print(f"  regime {k + 1} from record {start:>6,}: weights {weights.tolist()}", file=out)
        print("running the consumer (prequential: predict, then learn) ...", file=out, flush=True)
        show = _LiveProgress(out)
        counters = run_consumer(settings, on_batch=show)
        show.finish()
        topics = settings.topics
        print(
            f"\ndone in {time.monotonic() - began:.1f} s: {counters.records_in:,} records in, "
            f"{counters.assigned:,} assignments, {counters.dead_lettered} dead letters, "
            f"{counters.drift_events} drift events",
            file=out,
        )
        print("outputs (JSON, on the embedded broker, gone when it stops):", file=out)
        for kind, name in topics.items():
            if kind != "statistics" or settings.replicate:
                print(f"  {kind:<12} {name}", file=out)
        _show_samples(broker.bootstrap_servers, topics, out, middle=records // 2)
        if regime_records:
            run_regime_part(broker.bootstrap_servers, regime_records, seed, client, out)
    return 0


class _LiveProgress:
    """One status line, rewritten in place on a terminal, a line per second otherwise."""

    def __init__(self, out):
        self.out = out
        self.last = 0.0
        self.tty = out.isatty()

    def __call__(self, progress: Progress) -> None:
        for drift in progress.drifts:
            body = json.loads(drift.value)
            if body["drift"]:
                print(
                    ("\r" if self.tty else "")
                    + f"  drift at input offset {body['source']['partition']}@{body['source']['offset']} "
                    f"(~record {body['n_seen']:,}): weights {_fmt(body['weights'])} vs reference "
                    f"{_fmt(body['reference_weights'])}" + " " * 10,
                    file=self.out,
                    flush=True,
                )
        now = time.monotonic()
        if now - self.last < (0.5 if self.tty else 1.0):
            return
        self.last = now
        rate = progress.counters.records_in / max(progress.elapsed_s, 1e-9)
        print(
            ("\r" if self.tty else "")
            + f"  {progress.counters.records_in:>7,} records  {rate:>7,.0f}/s  model weights {_fmt(progress.weights)}"
            f"  drift events {progress.counters.drift_events}  dead letters {progress.counters.dead_lettered}   ",
            end="" if self.tty else "\n",
            file=self.out,
            flush=True,
        )

    def finish(self) -> None:
        if self.tty:
            print(file=self.out)


def _fmt(weights) -> str:
    return "[" + " ".join(f"{w:.2f}" for w in weights) + "]"


def _rounded(value):
    """JSON numbers to 4 significant digits, so a sample record fits on a line and every field stays visible."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _shorten(record: str, width: int = 400) -> str:
    """A sample output record for the terminal: numbers rounded, and cut (`text.shorten`) only if still long."""
    return shorten(json.dumps(_rounded(json.loads(record)), separators=(", ", ": "), ensure_ascii=False), width)


def _show_samples(bootstrap_servers: str, topics: dict, out, middle: int) -> None:
    """Print one record of each output: a late assignment, a dead letter, a declared drift."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False)
    wanted = {
        "assignments": (middle, lambda body: True),  # past the warm-up: a confident answer
        "dead_letter": (0, lambda body: True),
        "drift": (0, lambda body: body.get("drift")),
    }
    try:
        for kind, (start, keep) in wanted.items():
            tp = TopicPartition(topics[kind], 0)
            consumer.assign([tp])
            consumer.seek(tp, start)
            deadline = time.monotonic() + 5
            found = None
            while found is None and time.monotonic() < deadline:
                for message in consumer.poll(timeout_ms=300).get(tp, []):
                    if keep(json.loads(message.value)):
                        found = message.value.decode()
                        break
            if found:
                print(f"  sample {kind}: {_shorten(found)}", file=out)
    finally:
        with silent_client():  # a metadata refresh in flight when it closes is logged at ERROR: not news here
            consumer.close()
