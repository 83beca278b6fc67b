"""The consumer's end-to-end rate against the loop a user would write by hand, on the same embedded broker.

Loops compared, per client (kafka-python and confluent-kafka), on 100,000 two-feature JSON
records in two partitions:

- hand-written: the raw client's consumer and producer, `orjson` decode of each value and
  encode of a small output record with its source offset, an asynchronous commit per poll; no
  project classes;
- bare: the same pass-through through the project's own source and sink classes (outputs
  acknowledged and offsets committed every 10,000 records);
- streamem: `run_consumer` with default settings (the model in a child process), and with
  `--no-model-process` (one process).

Every rate is taken from the output records' timestamps (first to last), so the consumer-group
join and the final flush count for none of them. Run: `python benchmarks/kafka_pipeline.py` (not
kafka.py: that name would shadow the kafka package); writes the "kafka" section of BENCHMARKS.md,
with the per-record cost of the model path measured without a broker (`model_path_costs`).
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import orjson

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

from streamem_connectors.kafka.broker import EmbeddedBroker  # noqa: E402
from streamem_connectors.kafka.clients import make_sink, make_source  # noqa: E402
from streamem_connectors.kafka.pipeline import run_consumer  # noqa: E402
from streamem_connectors.kafka.records import OutputRecord  # noqa: E402
from streamem_connectors.kafka.settings import ConsumerSettings  # noqa: E402
from streamem_connectors.kafka.topics import ensure_topics  # noqa: E402

RECORDS = 100_000
PARTITIONS = 2
REPEATS = 5
POLL = 1024  # the consumer's default --max-poll-records, used by every loop


def points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random((n, 1)) < 0.5, [0.0, 0.0], [6.0, 2.0]) + rng.normal(size=(n, 2))


def fill(bootstrap: str, topic: str, n: int, partitions: int = PARTITIONS) -> None:
    """`n` records {"x", "y"}, spread round-robin over the partitions."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i, (x, y) in enumerate(points(n).tolist()):
        value = orjson.dumps({"x": round(x, 5), "y": round(y, 5)})
        while True:
            try:
                producer.produce(topic, value, partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def output_timestamps(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> np.ndarray:
    """The timestamps (ms) of the first `expected` records of every partition of `topic`."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "timestamps", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        stamps: list[int] = []
        deadline = time.monotonic() + timeout_s
        while len(stamps) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(stamps)} of {expected} records on {topic} within {timeout_s} s")
            stamps.extend(m.timestamp()[1] for m in consumer.consume(10_000, 0.5) if not m.error())
        return np.array(stamps)
    finally:
        consumer.close()


def rate_from(stamps: np.ndarray) -> float:
    """Records per second between the first and the last output record's timestamp."""
    return (len(stamps) - 1) / max(1e-3, (stamps.max() - stamps.min()) / 1000)


def settings_for(bootstrap: str, topic: str, client: str) -> ConsumerSettings:
    """The consumer's defaults, but for where, what, how many and its log level."""
    return ConsumerSettings(
        bootstrap_servers=bootstrap,
        input_topic=topic,
        group_id=f"{topic}-g",
        features=["x", "y"],
        n_components=2,
        max_records=RECORDS,
        client=client,
        log_level="WARNING",
    )


# -- the loops a user would write by hand (no project classes) -------------------------------------
def hand_confluent(bootstrap: str, topic: str, out: str, group: str, n: int) -> None:
    from confluent_kafka import Consumer, Producer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    consumer.subscribe([topic])
    done = 0
    try:
        while done < n:
            messages = consumer.consume(min(POLL, n - done), 0.5)
            for message in messages:
                if message.error():
                    continue
                value = orjson.loads(message.value())
                answer = {"partition": message.partition(), "offset": message.offset(), "x": value["x"]}
                answer["y"] = value["y"]
                while True:
                    try:
                        producer.produce(out, orjson.dumps(answer))
                        break
                    except BufferError:
                        producer.poll(0.05)
                done += 1
            producer.poll(0)
            if messages:
                consumer.commit(asynchronous=True)
        producer.flush(60)
    finally:
        consumer.close()


def hand_kafka_python(bootstrap: str, topic: str, out: str, group: str, n: int) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=POLL,
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    done = 0
    try:
        while done < n:
            batches = consumer.poll(timeout_ms=500, max_records=min(POLL, n - done))
            for messages in batches.values():
                for message in messages:
                    value = orjson.loads(message.value)
                    answer = {"partition": message.partition, "offset": message.offset, "x": value["x"]}
                    answer["y"] = value["y"]
                    producer.send(out, orjson.dumps(answer))
                    done += 1
            if batches:
                consumer.commit_async()
        producer.flush(60)
        producer.close()
    finally:
        consumer.close(autocommit=False)


def hand_loop(settings: ConsumerSettings) -> None:
    loop = hand_confluent if settings.client == "confluent" else hand_kafka_python
    loop(settings.bootstrap_servers, settings.input_topic, settings.topics["assignments"], settings.group_id, RECORDS)


# -- the pass-through through the project's source and sink classes, and the consumer --------------
def bare_loop(settings: ConsumerSettings) -> None:
    """Consume, pass each value through to an output topic; flush and commit on the consumer's cadence."""
    source, sink = make_source(settings, lambda _: {}), make_sink(settings)
    out = settings.topics["assignments"]
    done, unsaved = 0, 0
    offsets: dict = {}
    try:
        while done < RECORDS:
            batch = source.poll(min(POLL, RECORDS - done), settings.poll_timeout_ms)
            if not batch.size:
                continue
            sink.send([OutputRecord(out, key, value) for key, value in zip(batch.keys, batch.values, strict=True)])
            offsets.update(batch.next_offsets())
            done += batch.size
            unsaved += batch.size
            if unsaved >= settings.checkpoint_every or done == RECORDS:
                sink.flush()
                source.commit(offsets)
                unsaved = 0
    finally:
        source.close()
        sink.close()


def streamem_loop(settings: ConsumerSettings) -> None:
    run_consumer(settings)


LOOPS = {
    "hand": hand_loop,
    "bare": bare_loop,
    "streamem": streamem_loop,
    "streamem, one process": lambda settings: streamem_loop(settings.model_copy(update={"model_process": False})),
}


def measure(bootstrap: str, client: str, kind: str, name: str) -> float:
    settings = settings_for(bootstrap, name, client)
    ensure_topics(settings, input_partitions=PARTITIONS)
    fill(bootstrap, name, RECORDS)
    LOOPS[kind](settings)
    return rate_from(output_timestamps(bootstrap, settings.topics["assignments"], RECORDS))


# -- the model path, per record, without a broker -------------------------------------------------
BREAKDOWN_RECORDS = 200_000


def model_path_costs(client: str = "confluent", n: int = BREAKDOWN_RECORDS) -> dict[str, float]:
    """Microseconds per record of each step the answerer takes for a poll batch, without a broker.

    The steps are those of the consumer's hot path: decoding (in the consume loop's process, while the
    model process answers the batch before), the pipe between the two processes (the main process's side,
    and the child's), scoring and learning, the drift detector, encoding the assignments, and the
    producer's calls (to a producer whose broker is never reached: the call's own cost). Scoring, learning,
    drift and encoding are timed each alone, and together as the consumer runs them: the instance learner's
    `process` of the batch (on a second model, learning the same batches), which the model path counts.
    Beside them, on the same batches, the per-record work of the hand-written loop
    (`hand_confluent`: orjson decode, a small answer, orjson encode, the produce call) as a yardstick:
    this machine's speed moves from run to run, the ratio of the two much less. The yardstick is a little
    cheaper than the loop itself (its client's message objects and their accessors are not in it, and it
    runs under the model process's collector settings), so the ratio errs against streamem.
    """
    import multiprocessing
    import pickle

    from _offline import MemoryStore, no_input_positions

    from streamem.drift import WeightDriftDetector
    from streamem_connectors.kafka import records as schemas
    from streamem_connectors.kafka.learner import assign_and_screen, new_model
    from streamem_connectors.kafka.model_process import spare_the_collector
    from streamem_connectors.kafka.modes import make_learner
    from streamem_connectors.kafka.records import InputBatch

    settings = ConsumerSettings(
        bootstrap_servers="127.0.0.1:9", input_topic="breakdown", features=["x", "y"], n_components=2, client=client
    )
    values = [orjson.dumps({"x": round(x, 5), "y": round(y, 5)}) for x, y in points(n).tolist()]
    batches = [
        InputBatch(
            "breakdown",
            [i % 2 for i in range(start, min(n, start + POLL))],
            [i // 2 for i in range(start, min(n, start + POLL))],
            [None] * len(values[start : start + POLL]),
            values[start : start + POLL],
        )
        for start in range(0, n, POLL)
    ]
    decoder = schemas.RecordDecoder(settings.features)
    model, detector = new_model(settings), WeightDriftDetector(2)
    no_input_positions()
    learner = make_learner(settings, MemoryStore())
    out = settings.topics["assignments"]
    producer = _unreachable_producer(client)
    sender, receiver = multiprocessing.Pipe()
    spare_the_collector()  # as the model process does: the inputs held here are not the collector's work
    hand_work = _hand_written_work()
    seconds = dict.fromkeys(["pipe, main process", "pipe, child", "decode", "predict + learn", "drift", "encode",
                             "produce call", HAND_WORK, LEARNER], 0.0)
    clock = time.thread_time  # this thread's CPU: neither other processes on the machine nor the client's threads
    warm, timed = False, 0
    for batch in batches:
        was_warm = model.is_warm
        t_decode = clock()
        batch = batch.decoded_by(decoder)  # in the loop's process
        t0 = clock()
        sender.send_bytes(pickle.dumps([("process", (batch,))]))  # as multiprocessing's Connection.send does
        t1 = clock()
        sent = pickle.loads(receiver.recv_bytes())[0][1][0]
        received, decoded = sent.records_view(), sent.decoded
        t2 = clock()
        resp, log_likelihood, _, _ = assign_and_screen(model, settings, decoded.values)
        seen = model.n_seen
        if model.is_warm:  # as the learner learns a poll: from the responsibilities it was answered with
            model.learn_answered(decoded.values, resp)
        else:
            model.learn_many(decoded.values)
        t4 = clock()
        if warm:
            detector.update_many(resp)
        warm = warm or model.is_warm
        t5 = clock()
        answers = schemas.assignments(received, out, resp, log_likelihood, seen)
        t6 = clock()
        sending = producer(answers)
        next(sending)
        t7 = clock()
        next(sending, None)
        t8 = clock()
        handing = hand_work(batch)
        next(handing)
        t9 = clock()
        next(handing, None)
        t10 = clock()
        learner.process(received, decoded)  # the same steps but the produce call, as the model process runs them
        t11 = clock()
        # the steady state: the warm-up (and its fit) is a model's one-off cost
        if not was_warm or not learner.state.model.is_warm:
            continue
        timed += len(received)
        # decoding counts in the model path, though the loop's process runs it
        spans = (t1 - t0, t2 - t1, t0 - t_decode, t4 - t2, t5 - t4, t6 - t5, t7 - t6, t9 - t8, t11 - t10)
        for name, spent in zip(seconds, spans, strict=True):
            seconds[name] += spent
    if not timed:
        raise ValueError(f"{n} records never warmed the model up: time more than its warm-up")
    return {name: 1e6 * spent / timed for name, spent in seconds.items()}


def _unreachable_producer(client: str):
    """The consumer's own sink's `send` (its producer's calls) on a producer whose broker is never reached; the
    records are dropped from its queue after each call (untimed), as acknowledgements would."""
    import logging

    from streamem_connectors.kafka.clients import make_sink

    logging.getLogger("confluent_kafka").setLevel(logging.CRITICAL)  # its connection refused, again and again
    settings = ConsumerSettings(bootstrap_servers="127.0.0.1:9", features=["x"], client=client)
    sink = make_sink(settings)

    def produce(records):
        sink.send(records)
        yield
        sink._producer.purge()  # this benchmark's clean-up, not timed: the queue would fill up otherwise
        sink._producer.poll(0)
        sink._pending.clear()
        sink._failures.clear()

    return produce


HAND_WORK = "hand-written loop's work"
LEARNER = "predict, learn, drift and encode through the learner (`InstanceLearner.process`)"


def _hand_written_work():
    """`hand_confluent`'s work for each record of a batch, its producer's broker never reached; the records
    are dropped from its queue after the batch (untimed, after the first `next`)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": "127.0.0.1:9", "acks": "all", "linger.ms": 5, "log_level": 0})

    def work(batch):
        for partition, offset, raw in zip(batch.partitions, batch.offsets, batch.values, strict=True):
            value = orjson.loads(raw)
            answer = {"partition": partition, "offset": offset, "x": value["x"]}
            answer["y"] = value["y"]
            producer.produce("out", orjson.dumps(answer))
        yield
        producer.purge()
        producer.poll(0)

    return work


def breakdown_table(repeats: int = 3) -> str:
    runs = [model_path_costs() for _ in range(repeats)]
    costs = {name: float(np.median([run[name] for run in runs])) for name in runs[0]}
    model_path = ["decode", LEARNER, "produce call"]
    hand = costs.pop(HAND_WORK)
    steps = ["pipe, main process", "pipe, child", "decode", "predict + learn", "drift", "encode", LEARNER]
    lines = [f"| {name} | {costs[name]:.2f} |" for name in [*steps, "produce call"]]
    total = sum(costs[name] for name in model_path)
    return (
        f"Per-record cost of the model path without a broker (`model_path_costs`: {BREAKDOWN_RECORDS:,} records "
        f"in polls of {POLL}, K=2, d=2, confluent producer; median of {repeats}; timed from the first batch of "
        "a warm model, learned as the consumer learns it; CPU time of the thread). Predict + learn, drift and "
        "encode are timed each alone, then together as the consumer runs them (the instance learner's `process`, "
        "its bookkeeping included), which the model path counts. Goal: at most 2 us in all for decode, predict + "
        "learn, drift, encode and the produce call. The yardstick, timed on the same batches: "
        "the hand-written loop's work per record (orjson decode, a 4-field answer, orjson encode, the produce "
        "call).\n\n"
        "| step | us/record |\n|---|---|\n" + "\n".join(lines)
        + f"\n| **model path (decode, the learner, the produce call)** | **{total:.2f}** |\n"
        f"| hand-written loop's work (yardstick) | {hand:.2f} |\n"
        f"| model path / hand-written work | {total / hand:.2f}x |\n"
    )


def main(argv: list[str]) -> None:
    """`--quick CLIENT KIND...`: those loops only, 3 runs each, printed, nothing written."""
    if argv[:1] == ["--breakdown"]:
        print(breakdown_table(1))
        return
    quick = argv[:1] == ["--quick"]
    clients = argv[1:2] if quick else ["kafka-python", "confluent"]
    kinds = argv[2:] if quick else list(LOOPS)
    repeats = 3 if quick else REPEATS
    rows = []
    with EmbeddedBroker() as broker:
        for client in clients:
            rates: dict[str, list[float]] = {kind: [] for kind in kinds}
            for repeat in range(repeats):
                for number, kind in enumerate(kinds):
                    rate = measure(broker.bootstrap_servers, client, kind, f"bench-{client}-{number}-{repeat}")
                    rates[kind].append(rate)
                    print(f"{client:<12} {kind:<22} {rate:>10,.0f} records/s", flush=True)
            for kind, values in rates.items():
                print(f"{client:<12} {kind:<22} runs: {', '.join(f'{v:,.0f}' for v in values)}", flush=True)
            if quick:
                continue
            medians = {kind: float(np.median(values)) for kind, values in rates.items()}
            hand, bare, ours, single = (medians[k] for k in LOOPS)
            spread = [v / h for v, h in zip(rates["streamem"], rates["hand"], strict=True)]
            rows.append(
                f"| {client} | {hand:,.0f} | {bare:,.0f} | {ours:,.0f} | **{ours / hand:.2f}x** "
                f"({min(spread):.2f}-{max(spread):.2f}) | {ours / bare:.2f}x | {single:,.0f} | {single / hand:.2f}x |"
            )
    if quick:
        return
    body = (
        "## Kafka pipeline vs the loop a user would write by hand\n\n"
        f"Embedded Tansu broker, {RECORDS:,} JSON records `{{\"x\", \"y\"}}` in {PARTITIONS} partitions, polls of "
        f"up to {POLL}. Rates are taken from the output records' timestamps (first to last), so group joins and "
        "final flushes count for none of the loops. Median of "
        f"{REPEATS} runs; the range of the per-run ratio in brackets.\n\n"
        "- **hand-written**: the raw client (`confluent_kafka.Consumer`/`Producer`, or kafka-python's "
        "`KafkaConsumer`/`KafkaProducer`), `orjson` decode of each value and encode of a small output record "
        "with its source offset, an asynchronous commit per poll, acks=all, linger 5 ms; no project classes.\n"
        "- **bare**: a pass-through through the project's own source and sink classes, outputs acknowledged and "
        "offsets committed every 10,000 records.\n"
        "- **streamem**: `run_consumer` with default settings (decoding and validation in the loop's process; "
        "the model in a child process: predict, learn K=2 d=2, drift detector, checkpoints); **one process**: "
        "`--no-model-process`.\n\n"
        "Goals: confluent at least 0.5x the hand-written loop, kafka-python at least 1.0x.\n\n"
        "| client | hand-written records/s | bare records/s | streamem records/s | vs hand-written | vs bare "
        "| one process records/s | vs hand-written |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + breakdown_table()
    )
    write_section("kafka", body)


if __name__ == "__main__":
    main(sys.argv[1:])
