"""Online estimators against River's KMeans: learn_one / predict_one rates, and learn_many throughput.

Run: `python benchmarks/online.py` (or `make bench`). Writes the "online" section of BENCHMARKS.md.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import pandas as pd
from river import cluster

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

import streamem as se  # noqa: E402

REPEATS = 5
N_RECORDS = 40_000


def records(n: int, d: int, K: int, rng) -> list[dict]:
    means = rng.normal(0, 4, (K, d))
    X = means[rng.integers(K, size=n)] + rng.normal(size=(n, d))
    names = [f"x{i}" for i in range(d)]
    return [dict(zip(names, row)) for row in X.tolist()]


def rate(action, stream) -> float:
    """Records per second of `action` over the stream: median of REPEATS runs."""
    rates = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        for x in stream:
            action(x)
        rates.append(len(stream) / (time.perf_counter() - began))
    return float(np.median(rates))


def per_record(d: int, K: int, rng) -> str:
    train, test = records(N_RECORDS, d, K, rng), records(5_000, d, K, rng)
    ours = se.OnlineGMM(K, warmup=1000, batch_size=128, seed=0)
    theirs = cluster.KMeans(n_clusters=K, seed=0)
    # learn rates are measured on models that keep learning: each repeat goes on from the last
    ours_learn = rate(ours.learn_one, train)
    theirs_learn = rate(theirs.learn_one, train)
    ours_predict = rate(ours.predict_one, test)
    theirs_predict = rate(theirs.predict_one, test)
    return (
        f"| d={d}, K={K} | {ours_learn:,.0f} | {theirs_learn:,.0f} | **{ours_learn / theirs_learn:.2f}x** "
        f"| {ours_predict:,.0f} | {theirs_predict:,.0f} | **{ours_predict / theirs_predict:.2f}x** |"
    )


def many(rng) -> list[str]:
    """learn_many rates with default settings (batch_size=128, default step and warm-up), and with a
    larger batch beside it (tuned): records/s over 1024-record DataFrames, median of REPEATS passes."""
    d, K, size = 10, 8, 1024
    frame = pd.DataFrame(np.vstack([np.array(list(r.values())) for r in records(200_000, d, K, rng)]))
    frame.columns = [f"x{i}" for i in range(d)]
    batches = [frame.iloc[i : i + size] for i in range(0, len(frame), size)]
    rows = []
    cases = (("default settings (batch_size=128)", {}), ("tuned: batch_size=1024", {"batch_size": 1024}))
    for label, settings in cases:
        rates = []
        for _ in range(REPEATS):
            model = se.OnlineGMM(K, seed=0, **settings)  # covariance_type="full" is the default
            warm = 0
            while not model.is_warm:  # the warm-up (and its batch EM) is not timed
                model.learn_many(batches[warm])
                warm += 1
            began = time.perf_counter()
            for batch in batches[warm:]:
                model.learn_many(batch)
            rates.append(sum(len(b) for b in batches[warm:]) / (time.perf_counter() - began))
        rows.append(
            f"| learn_many, d={d}, K={K}, full, {size}-record DataFrames, {label} | {np.median(rates):,.0f} records/s |"
        )
        print(rows[-1], flush=True)
    return rows

def main() -> None:
    rng = np.random.default_rng(0)
    rows = [per_record(2, 3, rng), per_record(10, 8, rng)]
    for row in rows:
        print(row, flush=True)
    bulk = many(rng)
    body = (
        "## Online: `OnlineGMM` vs River `cluster.KMeans`\n\n"
        f"Records/s, median of {REPEATS} passes over {N_RECORDS:,} records (learn) and 5,000 (predict), full\n"
        "covariances, `batch_size=128`. Goals: learn_one at least 1x River's KMeans, predict_one at least 0.5x,\n"
        "learn_many above 1M records/s with default settings (the outlier guard on; the warm-up not timed).\n\n"
        "| case | learn_one streamem | learn_one KMeans | ratio | predict_one streamem | predict_one KMeans | ratio |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n| case | streamem |\n|---|---|\n" + "\n".join(bulk)
    )
    write_section("online", body)


if __name__ == "__main__":
    main()
