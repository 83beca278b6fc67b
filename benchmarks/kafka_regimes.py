"""The consumer with `--model hmm`: one model per instance against one replicated through the
statistics log (`--replicate`), on the same records.

100,000 JSON records `{"x", "y"}` of a sticky two-state chain (stays with probability 0.99; means
(0, 0) and (3, 1), unit noise), 50,000 on each of two partitions, K=2, the consumer's defaults
otherwise. `run_consumer` on the embedded broker, one process; the rate is taken from the output
records' timestamps (first to last), so the group join and the final flush count for neither.
`--model gmm` on the same records is the third row, for scale. A replica publishes a statistics
message per block of `--batch-size` records of a partition and reads its own messages back before
its next poll: that round trip is what `--replicate` costs.

Run: `python benchmarks/kafka_regimes.py` (writes the "kafka-regimes" section of BENCHMARKS.md).
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import orjson

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402
from kafka_keyed import fill  # noqa: E402
from kafka_pipeline import output_timestamps, rate_from  # noqa: E402

from streamem_connectors.kafka.settings import ConsumerSettings  # noqa: E402

RECORDS = 100_000
PARTITIONS = 2
REPEATS = 3
MODES = {
    "`--model hmm` (a model per instance)": dict(model="hmm"),
    "`--model hmm --replicate` (one replica)": dict(model="hmm", replicate=True),
    "`--model gmm` (a mixture per instance)": dict(model="gmm"),
}


def records(seed: int = 0) -> list[tuple[int, None, bytes]]:
    """(partition, key, value): each partition's records a sticky chain of its own."""
    rng = np.random.default_rng(seed)
    out = []
    for partition in range(PARTITIONS):
        n = RECORDS // PARTITIONS
        switches = rng.random(n) > 0.99
        states = np.cumsum(switches) % 2
        xy = np.array([[0.0, 0.0], [3.0, 1.0]])[states] + rng.normal(size=(n, 2))
        out += [(partition, None, orjson.dumps({"x": round(x, 5), "y": round(y, 5)})) for x, y in xy.tolist()]
    return out


def consumer_rate(bootstrap: str, topic: str, data, mode: dict) -> float:
    from streamem_connectors.kafka.pipeline import run_consumer
    from streamem_connectors.kafka.topics import ensure_topics

    settings = ConsumerSettings(
        bootstrap_servers=bootstrap,
        input_topic=topic,
        group_id=f"{topic}-g",
        features=["x", "y"],
        n_components=2,
        max_records=RECORDS,
        log_level="WARNING",
        **mode,
    )
    ensure_topics(settings, input_partitions=PARTITIONS)
    fill(bootstrap, topic, data)
    run_consumer(settings)
    return rate_from(output_timestamps(bootstrap, settings.topics["assignments"], RECORDS, timeout_s=120))


def main() -> None:
    from streamem_connectors.kafka.broker import EmbeddedBroker

    data = records()
    rates: dict[str, list[float]] = {name: [] for name in MODES}
    with EmbeddedBroker() as broker:
        for repeat in range(REPEATS):
            for i, (name, mode) in enumerate(MODES.items()):
                rate = consumer_rate(broker.bootstrap_servers, f"regimes-{i}-{repeat}", data, mode)
                rates[name].append(rate)
                print(f"{name:<45} {rate:>10,.0f} records/s", flush=True)
    reference = rates[next(iter(MODES))]
    rows = []
    for name, measured in rates.items():
        ratios = [r / s for r, s in zip(measured, reference, strict=True)]
        rows.append(f"| {name} | {np.median(measured):,.0f} | **{np.median(ratios):.2f}x** "
                    f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    body = (
        "## The consumer with `--model hmm`, replicated or not\n\n"
        f"{RECORDS:,} JSON records `{{\"x\", \"y\"}}` of a sticky two-state chain, {PARTITIONS} partitions, "
        "K=2, d=2, the consumer's defaults otherwise; `run_consumer` on the embedded broker, rate from the "
        f"output records' timestamps (first to last). Median of {REPEATS} runs; the ratio is to the first "
        "row in the same repeat (its range in brackets).\n\n"
        "| mode | records/s | vs `--model hmm` |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    write_section("kafka-regimes", body)


if __name__ == "__main__":
    main()
