"""The demo's second part: regimes that persist, answered by a mixture and by a hidden Markov model.

A stream whose hidden regime lasts ~250 records (two overlapping Gaussians, 2.5 sd apart) goes
through the consumer twice: `--model gmm` labels each record on its own and flickers between
components wherever the regimes overlap; `--model hmm` follows the regime from record to record
and announces each change once (`regime_change` records on the drift topic).
"""

from __future__ import annotations

import json

import numpy as np

from streamem_connectors.kafka.settings import ConsumerSettings
from streamem_connectors.kafka.topics import ensure_topics

__all__ = ["regime_stream", "run_regime_part"]

MEANS = np.array([[0.0, 0.0], [2.5, 0.5]])


def regime_stream(n: int, seed: int, mean_duration: float = 250.0) -> tuple[np.ndarray, np.ndarray]:
    """(records (n, 2), regime (n,)): regimes of geometric length, the first one short enough for the
    consumer's warm-up (its first 1,000 records) to see both."""
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(200, 400))]
    while sum(lengths) < n:
        lengths.append(int(rng.geometric(1.0 / mean_duration)))
    regime = np.repeat(np.arange(len(lengths)) % 2, lengths)[:n]
    return MEANS[regime] + rng.normal(size=(n, 2)), regime


def _produce(bootstrap_servers: str, topic: str, X: np.ndarray) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=20, batch_size=512 * 1024)
    futures = [producer.send(topic, value=json.dumps({"x": x, "y": y}).encode()) for x, y in X.round(4).tolist()]
    producer.flush()
    producer.close()
    if not all(f.succeeded() for f in futures):
        raise RuntimeError("the broker did not acknowledge every demo record")


def _read(bootstrap_servers: str, topic: str) -> list[dict]:
    """Every record of a one-partition topic, up to its end when asked (or what came within 10 s)."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    found: list[dict] = []
    deadline = time.monotonic() + 10
    try:
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for message in consumer.poll(timeout_ms=300).get(tp, []):
                found.append(json.loads(message.value))
    finally:
        consumer.close()
    return found


def run_regime_part(bootstrap_servers: str, records: int, seed: int, client: str, out) -> dict:
    """Run both models on one regime stream; print and return how often each changed its label."""
    from streamem_connectors.kafka.pipeline import run_consumer

    X, regime = regime_stream(records, seed)
    true_switches = int((np.diff(regime) != 0).sum())
    print(
        f"\nregimes that persist: {records:,} records whose hidden regime lasts ~250 records "
        f"({true_switches} switches), through --model gmm and --model hmm ...",
        file=out,
        flush=True,
    )
    result = {"true": true_switches}
    for model in ("gmm", "hmm"):
        settings = ConsumerSettings(
            bootstrap_servers=bootstrap_servers,
            input_topic=f"demo.regimes.{model}",
            features=["x", "y"],
            model=model,
            n_components=2,
            warmup=1000,
            batch_size=128,
            max_records=records,
            client=client,
            log_level="WARNING",
        )
        ensure_topics(settings, input_partitions=1)
        _produce(bootstrap_servers, settings.input_topic, X)
        run_consumer(settings)
        answers = _read(bootstrap_servers, settings.topics["assignments"])
        labels = np.array([a["component"] for a in sorted(answers, key=lambda a: a["source"]["offset"])])
        result[model] = int((np.diff(labels[1000:]) != 0).sum())  # after the warm-up
        if model == "hmm":
            drifts = _read(bootstrap_servers, settings.topics["drift"])
            result["regime_changes"] = sum(1 for d in drifts if d.get("regime_change"))
    print(
        f"  label switches after the warm-up: mixture {result['gmm']:,}, hidden Markov model {result['hmm']:,} "
        f"({result['regime_changes']} regime_change records; the stream switched {true_switches} times)",
        file=out,
        flush=True,
    )
    return result
