"""Keyed models (`--model-key`) at scale against one model, on the same records.

200,000 JSON records `{"x", "y", "k"}` with 5,000 keys (40 records a key, in shuffled order), two
features, K=2, the consumer's defaults otherwise (--warmup 500: with 40 records a key no key's
model ever warms up, so every key answers from its provisional warm-up model). Two measurements:

- **consumer**: `run_consumer` on the embedded broker with `model_key="k"`, against the same
  records with one model (no `model_key`). The rate is taken from the output records' timestamps
  (first to last, as `kafka_pipeline.py` does), so the group join and the final flush count for
  neither.
- **learner alone**: `KeyedLearner.process` / `InstanceLearner.process` on poll batches built in
  memory (no broker, no pipe, no producer), timed with this thread's CPU clock; with the time
  per record of each part of the keyed path from a profile, and the memory it holds (tracemalloc);
  also with `--model hmm` (`RegimeLearner`: one hidden Markov model, a filter per key, against a
  filter per partition). The records are i.i.d. draws, not regimes: about half of them move the
  most likely state, so the hmm rows carry that many `regime_change` records too.

Run: `python benchmarks/kafka_keyed.py` (writes the "keyed" section of BENCHMARKS.md);
`--learner` prints the learner-alone numbers only, `--consumer` one consumer run of each, `--profile`
the keyed path's profile.
"""

from __future__ import annotations

import gc
import pathlib
import sys
import time
import tracemalloc

import numpy as np
import orjson

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _offline import MemoryStore, no_input_positions  # noqa: E402
from _report import write_section  # noqa: E402
from kafka_pipeline import output_timestamps, rate_from  # noqa: E402

from streamem_connectors.kafka.modes import make_learner  # noqa: E402
from streamem_connectors.kafka.records import InputBatch  # noqa: E402
from streamem_connectors.kafka.settings import ConsumerSettings  # noqa: E402

RECORDS = 200_000
KEYS = 5_000
PARTITIONS = 2
POLL = 1024  # the consumer's default --max-poll-records
REPEATS = 3
GOAL = 0.5  # keyed at least half the single model's rate


def records(n: int = RECORDS, keys: int = KEYS, seed: int = 0) -> list[tuple[int, bytes, bytes]]:
    """(partition, message key, value) of `n` records, `n // keys` a key, in shuffled order; a key's
    records all go to one partition (producers key the messages by the model key)."""
    rng = np.random.default_rng(seed)
    key_of = rng.permutation(np.repeat(np.arange(keys), n // keys))
    xy = np.where(rng.random((n, 1)) < 0.5, [0.0, 0.0], [6.0, 2.0]) + rng.normal(size=(n, 2))
    xy += (key_of % 7)[:, None] * 0.25  # keys differ a little
    out = []
    for k, (x, y) in zip(key_of.tolist(), xy.tolist(), strict=True):
        name = f"key-{k}"
        out.append((k % PARTITIONS, name.encode(), orjson.dumps({"x": round(x, 5), "y": round(y, 5), "k": name})))
    return out


def settings_for(bootstrap: str, topic: str, keyed: bool, **extra) -> ConsumerSettings:
    """The consumer's defaults, but for where, what, how many, the model key and its log level."""
    return ConsumerSettings(
        bootstrap_servers=bootstrap,
        input_topic=topic,
        group_id=f"{topic}-g",
        features=["x", "y"],
        n_components=2,
        model_key="k" if keyed else None,
        max_records=RECORDS,
        log_level="WARNING",
        **extra,
    )


# -- the learner alone, without a broker ----------------------------------------------------------
def batches(data, poll: int = POLL) -> list[InputBatch]:
    """Poll batches of the records, offsets counted per partition."""
    next_offset = [0] * PARTITIONS
    partitions, offsets = [], []
    for partition, _, _ in data:
        partitions.append(partition)
        offsets.append(next_offset[partition])
        next_offset[partition] += 1
    return [
        InputBatch(
            "keyed",
            partitions[s : s + poll],
            offsets[s : s + poll],
            [key for _, key, _ in data[s : s + poll]],
            [value for _, _, value in data[s : s + poll]],
        )
        for s in range(0, len(data), poll)
    ]


def learner_for(keyed: bool, **extra):
    settings = settings_for("127.0.0.1:9", "keyed", keyed, checkpoint_dir=None, **extra)
    return make_learner(settings, MemoryStore())


def learner_run(keyed: bool, polls: list[InputBatch], memory: bool = False, **extra) -> dict[str, float]:
    """Records per second of `process` over the polls (thread CPU time), and with `memory` the bytes
    tracemalloc sees held after a quarter and after all of them (checkpointing every 10,000 records,
    as the consumer does by default, so models' dirty flags are cleared)."""
    no_input_positions()
    learner = learner_for(keyed, **extra)
    gc.collect()
    n, spent, held = 0, 0.0, []
    if memory:
        tracemalloc.start()
    unsaved = 0
    for i, batch in enumerate(polls):
        received = batch.records()
        t0 = time.thread_time()
        outputs = learner.process(received)
        spent += time.thread_time() - t0
        assert len(outputs) >= len(received)
        n += len(received)
        unsaved += len(received)
        learner.advance(batch.next_offsets())
        if unsaved >= 10_000:
            learner.checkpoint_entries()
            unsaved = 0
        if memory and i in (len(polls) // 4, len(polls) - 1):
            gc.collect()
            held.append((tracemalloc.get_traced_memory()[0], _rss()))
    if memory:
        tracemalloc.stop()
    result = {"rate": n / spent, "us": 1e6 * spent / n}
    if memory:
        (traced_quarter, rss_quarter), (traced_end, rss_end) = held
        result.update(held_quarter_mb=traced_quarter / 1e6, held_end_mb=traced_end / 1e6)
        result.update(rss_quarter_mb=rss_quarter / 1e6, rss_end_mb=rss_end / 1e6)
    return result


def _rss() -> int:
    """This process's resident memory now (bytes)."""
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def learner_rates(repeats: int = REPEATS, **extra) -> dict[str, list[float]]:
    polls = batches(records())
    rates: dict[str, list[float]] = {"keyed": [], "single": []}
    for _ in range(repeats):
        for kind in rates:
            rate = learner_run(kind == "keyed", polls, **extra)["rate"]
            rates[kind].append(rate)
            print(f"learner alone  {kind:<7} {rate:>10,.0f} records/s {extra or ''}", flush=True)
    return rates


def profile(top: int = 25) -> None:
    import cProfile
    import pstats

    polls = batches(records())
    profiler = cProfile.Profile()
    profiler.enable()
    learner_run(True, polls)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


# -- the consumer, on the embedded broker -----------------------------------------------------------
def fill(bootstrap: str, topic: str, data) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for partition, key, value in data:
        while True:
            try:
                producer.produce(topic, value, key=key, partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def consumer_rate(bootstrap: str, topic: str, keyed: bool, data) -> float:
    from streamem_connectors.kafka.pipeline import run_consumer
    from streamem_connectors.kafka.topics import ensure_topics

    settings = settings_for(bootstrap, topic, keyed)
    ensure_topics(settings, input_partitions=PARTITIONS)
    fill(bootstrap, topic, data)
    run_consumer(settings)
    return rate_from(output_timestamps(bootstrap, settings.topics["assignments"], RECORDS, timeout_s=120))


def consumer_rates(repeats: int = REPEATS) -> dict[str, list[float]]:
    from streamem_connectors.kafka.broker import EmbeddedBroker

    data = records()
    rates: dict[str, list[float]] = {"keyed": [], "single": []}
    with EmbeddedBroker() as broker:
        for repeat in range(repeats):
            for kind in rates:
                rate = consumer_rate(broker.bootstrap_servers, f"keyed-{kind}-{repeat}", kind == "keyed", data)
                rates[kind].append(rate)
                print(f"consumer       {kind:<7} {rate:>10,.0f} records/s", flush=True)
    return rates


def _row(name: str, rates: dict[str, list[float]]) -> str:
    keyed, single = (float(np.median(rates[k])) for k in ("keyed", "single"))
    spread = [k / s for k, s in zip(rates["keyed"], rates["single"], strict=True)]
    return (
        f"| {name} | {keyed:,.0f} | {single:,.0f} | **{keyed / single:.2f}x** "
        f"({min(spread):.2f}-{max(spread):.2f}) |"
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--profile"]:
        profile()
        return
    if argv[:1] == ["--consumer"]:
        print(_row("consumer", consumer_rates(1)))
        return
    learner = learner_rates()
    if argv[:1] == ["--learner"]:
        print(_row("learner alone", learner))
        return
    regimes = learner_rates(model="hmm")
    polls = batches(records())
    memory = {model: learner_run(True, polls, memory=True, model=model) for model in ("gmm", "hmm")}
    for model, held in memory.items():
        print(f"memory held, {model} (tracemalloc): {held['held_quarter_mb']:.1f} MB after a quarter, "
              f"{held['held_end_mb']:.1f} MB at the end; RSS {held['rss_quarter_mb']:.0f} MB, "
              f"{held['rss_end_mb']:.0f} MB", flush=True)
    consumer = consumer_rates()
    body = (
        "## Keyed models (`--model-key`) at scale\n\n"
        f"{RECORDS:,} JSON records `{{\"x\", \"y\", \"k\"}}`, {KEYS:,} keys ({RECORDS // KEYS} records a key, "
        f"shuffled), {PARTITIONS} partitions (a key's records in one), K=2, d=2, the consumer's defaults "
        "otherwise (--warmup 500: no key's model warms up, every key answers from its provisional "
        "warm-up model), against the same records with one model. **consumer**: `run_consumer` on the "
        "embedded broker, rate from the output records' timestamps (first to last). **learner alone**: "
        "`KeyedLearner.process` / `InstanceLearner.process` on polls of "
        f"{POLL} built in memory (thread CPU time; no broker, pipe or producer). Median of {REPEATS} runs; "
        "the range of the per-run ratio in brackets. Goal: keyed at least 0.5x the single model.\n\n"
        "| measured | keyed records/s | one model records/s | keyed vs one model |\n|---|---|---|---|\n"
        + _row("consumer", consumer) + "\n" + _row("learner alone", learner) + "\n"
        + _row("learner alone, `--model hmm` (a filter per key, parameters shared)", regimes) + "\n\n"
        "Memory the keyed learner holds (tracemalloc, after a quarter of the records and at the end): "
        + "; ".join(
            f"{model} {held['held_quarter_mb']:.1f} MB, {held['held_end_mb']:.1f} MB "
            f"(RSS {held['rss_quarter_mb']:.0f} MB, {held['rss_end_mb']:.0f} MB)"
            for model, held in memory.items()
        )
        + ".\n"
    )
    write_section("keyed", body)


if __name__ == "__main__":
    main(sys.argv[1:])
