"""The consumer's end-to-end rate against a bare consume-and-produce loop on the same embedded broker.

Both loops poll up to 1024 records, produce one output per input, wait for the
acknowledgements, and commit offsets every 10,000 records; the streamem loop also
decodes and validates, predicts, learns, feeds the drift detector and stores a
checkpoint. The consumer runs as it does by default (the model in a child process)
and with `--no-model-process` (everything in one process). Rates are measured from
the end of the first batch to the end of the last (the consumer-group join is
excluded). Run: `python benchmarks/kafka_pipeline.py` (not kafka.py: that name would
shadow the kafka package); writes the "kafka" section of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from streamem_connectors.kafka.broker import EmbeddedBroker  # noqa: E402
from streamem_connectors.kafka.clients import make_sink, make_source  # noqa: E402
from streamem_connectors.kafka.pipeline import run_consumer  # noqa: E402
from streamem_connectors.kafka.records import OutputRecord  # noqa: E402
from streamem_connectors.kafka.settings import ConsumerSettings  # noqa: E402
from streamem_connectors.kafka.topics import ensure_topics  # noqa: E402

RECORDS = 100_000
REPEATS = 5
POLL = 1024


def fill(bootstrap: str, topic: str, n: int) -> None:
    from confluent_kafka import Producer

    rng = np.random.default_rng(0)
    points = np.where(rng.random((n, 1)) < 0.5, [0.0, 0.0], [6.0, 2.0]) + rng.normal(size=(n, 2))
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for x, y in points.tolist():
        while True:
            try:
                producer.produce(topic, json.dumps({"x": round(x, 5), "y": round(y, 5)}).encode())
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def settings_for(bootstrap: str, topic: str, client: str) -> ConsumerSettings:
    return ConsumerSettings(
        bootstrap_servers=bootstrap,
        input_topic=topic,
        group_id=f"{topic}-g",
        features=["x", "y"],
        n_components=2,
        max_records=RECORDS,
        max_poll_records=POLL,
        client=client,
        log_level="WARNING",
        poll_timeout_ms=200,
    )


def bare_loop(settings: ConsumerSettings) -> float:
    """Consume, pass each value through to an output topic; flush and commit on the consumer's cadence."""
    source, sink = make_source(settings, lambda _: {}), make_sink(settings)
    out = settings.topics["assignments"]
    done, unsaved, first_at, first_count = 0, 0, None, 0
    offsets: dict = {}
    try:
        while done < RECORDS:
            batch = source.poll(min(POLL, RECORDS - done), settings.poll_timeout_ms)
            if not batch:
                continue
            sink.send([OutputRecord(out, r.key, r.value) for r in batch])
            offsets.update({(r.topic, r.partition): r.offset + 1 for r in batch})
            done += len(batch)
            unsaved += len(batch)
            if unsaved >= settings.checkpoint_every or done == RECORDS:
                sink.flush()
                source.commit(offsets)
                unsaved = 0
            if first_at is None:
                first_at, first_count = time.monotonic(), done
        return (done - first_count) / (time.monotonic() - first_at)
    finally:
        source.close()
        sink.close()


def streamem_loop(settings: ConsumerSettings) -> float:
    marks: list[tuple[float, int]] = []
    run_consumer(settings, on_batch=lambda p: marks.append((time.monotonic(), p.counters.records_in)))
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


LOOPS = {
    "bare": bare_loop,
    "streamem": streamem_loop,
    "streamem, one process": lambda settings: streamem_loop(settings.model_copy(update={"model_process": False})),
}


def main() -> None:
    rows = []
    with EmbeddedBroker() as broker:
        for client in ("kafka-python", "confluent"):
            rates: dict[str, list[float]] = {kind: [] for kind in LOOPS}
            for repeat in range(REPEATS):
                for number, (kind, loop) in enumerate(LOOPS.items()):
                    topic = f"bench-{client}-{number}-{repeat}"
                    settings = settings_for(broker.bootstrap_servers, topic, client)
                    ensure_topics(settings, input_partitions=1)
                    fill(broker.bootstrap_servers, topic, RECORDS)
                    rates[kind].append(loop(settings))
                    print(f"{client:<12} {kind:<22} {rates[kind][-1]:>10,.0f} records/s", flush=True)
            medians = {kind: float(np.median(values)) for kind, values in rates.items()}
            bare = medians["bare"]
            rows.append(
                f"| {client} | {bare:,.0f} | {medians['streamem']:,.0f} | **{medians['streamem'] / bare:.2f}x** "
                f"| {medians['streamem, one process']:,.0f} | {medians['streamem, one process'] / bare:.2f}x |"
            )
    body = (
        "## Kafka pipeline vs a bare consume-and-produce loop\n\n"
        f"Embedded Tansu broker, {RECORDS:,} JSON records of ~30 bytes, one partition, polls of {POLL}, acks=all,\n"
        "outputs acknowledged then offsets committed every 10,000 records in both loops; the streamem loop also\n"
        "validates, predicts, learns (K=2, d=2), runs the drift detector and stores a checkpoint. The consumer runs\n"
        "as by default, the model in a child process, and with `--no-model-process` (one process). Median of "
        f"{REPEATS} runs.\nGoal: at least 0.8x the bare loop.\n\n"
        "| client | bare loop records/s | streamem records/s | ratio | one process records/s | ratio |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    write_section("kafka", body)


if __name__ == "__main__":
    main()
