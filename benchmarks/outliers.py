"""Calibrate and time the outlier guard of the online estimators (streamem.outliers).

1. False rejections on Gaussian data: the squared distance of a Gaussian record to its own
   component is chi2(d); we draw 1e7 of them per d (exact, with known parameters), report the
   largest and the analytic tail P(chi2_d > threshold), and run OnlineGMM itself (estimated
   parameters, warm-up included) over 1e6 records of a two-component mixture.
2. Heavy tails: the daily returns of DAX, SMI, CAC and FTSE 1991-98 (tests/data), learned
   record by record: how many are refused, and the largest squared distance seen.
3. Cost: learn_many (d=10, K=8, full, 1024-record frames) and learn_one with the guard on
   (outliers="raise") and off (outliers="learn"), interleaved in one process, best of 7.

Run: `python benchmarks/outliers.py` (writes its section of BENCHMARKS.md).
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

import numpy as np
import pandas as pd
from scipy import special, stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

import streamem as se  # noqa: E402
from streamem.outliers import DEFAULT_THRESHOLD  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "eu_stock_markets.csv"
DIMENSIONS = (1, 2, 10, 100)


def log10_chi2_tail(x: float, d: int) -> float:
    """log10 P(chi2_d > x), from the upper incomplete gamma's leading term (x >> d), where scipy's
    sf underflows to 0: Gamma(s, y) ~ y^(s-1) e^-y, s = d/2, y = x/2."""
    s, y = d / 2.0, x / 2.0
    return ((s - 1.0) * math.log(y) - y - special.gammaln(s)) / math.log(10.0)


def gaussian_draws(d: int, n: int, rng: np.random.Generator) -> tuple[int, float]:
    """Refusals and the largest squared distance among n chi2(d) draws (as squared norms of N(0, I))."""
    refused, largest, chunk = 0, 0.0, max(1, 2_000_000 // d)
    for start in range(0, n, chunk):
        z = rng.standard_normal((min(chunk, n - start), d))
        squared = np.einsum("nd,nd->n", z, z)
        refused += int((squared > DEFAULT_THRESHOLD).sum())
        largest = max(largest, float(squared.max()))
    return refused, largest


def online_gaussian(n: int, rng: np.random.Generator) -> int:
    """Records OnlineGMM refuses among n from a two-component mixture in d=10 (estimated parameters)."""
    d = 10
    points = rng.standard_normal((n, d)) + 4.0 * rng.integers(2, size=(n, 1))
    model = se.OnlineGMM(2, batch_size=128, warmup=1000, seed=0)
    columns = [f"f{i}" for i in range(d)]
    for start in range(0, n, 100_000):
        model.learn_many(pd.DataFrame(points[start : start + 100_000], columns=columns))
    return model.n_outliers


def stock_returns() -> tuple[int, int, float]:
    prices = pd.read_csv(DATA)[["DAX", "SMI", "CAC", "FTSE"]].to_numpy(float)
    returns = np.diff(np.log(prices), axis=0)
    model = se.OnlineGMM(2, batch_size=50, warmup=300, seed=0)
    largest = 0.0
    for row in returns:
        if model.is_warm:
            largest = max(
                largest, float(model.screen_many(pd.DataFrame([row], columns=model._feature_names)).distance[0])
            )
        model.learn_one(dict(zip(["DAX", "SMI", "CAC", "FTSE"], row.tolist(), strict=True)))
    return model.n_outliers, len(returns), largest


def timings(rng: np.random.Generator, repeats: int = 7) -> dict[str, float]:
    """Best-of-`repeats` microseconds per record, guard on and off, interleaved."""
    d, K, n = 10, 8, 40_960
    points = rng.standard_normal((n + 2048, d)) + 3.0 * rng.integers(K, size=(n + 2048, 1))
    columns = [f"f{i}" for i in range(d)]
    frames = [pd.DataFrame(points[2048 + i : 2048 + i + 1024], columns=columns) for i in range(0, n, 1024)]
    records = [dict(zip(columns, row, strict=True)) for row in points[2048 : 2048 + 20_000].tolist()]
    best = {key: math.inf for key in ("many on", "many off", "one on", "one off")}
    for _ in range(repeats):
        for mode, tag in (("raise", "on"), ("learn", "off")):
            model = se.OnlineGMM(K, batch_size=128, warmup=2048, seed=0, outliers=mode)
            model.learn_many(pd.DataFrame(points[:2048], columns=columns))
            start = time.perf_counter()
            for frame in frames:
                model.learn_many(frame)
            best[f"many {tag}"] = min(best[f"many {tag}"], (time.perf_counter() - start) / n * 1e6)
            model = se.OnlineGMM(K, batch_size=128, warmup=2048, seed=0, outliers=mode)
            model.learn_many(pd.DataFrame(points[:2048], columns=columns))
            start = time.perf_counter()
            for record in records:
                model.learn_one(record)
            best[f"one {tag}"] = min(best[f"one {tag}"], (time.perf_counter() - start) / len(records) * 1e6)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    n_draws = 10_000_000
    lines = [
        "## Outlier guard: false rejections and cost",
        "",
        f"Default `outlier_threshold` = {DEFAULT_THRESHOLD:.0e} (squared distance; 1000 sd). Gaussian records: "
        f"{n_draws:,} chi2(d) draws per d (a record's squared distance to its own component, known parameters).",
        "",
        "| d | chi2 quantile 1 - 1e-6 | log10 P(chi2_d > 1e6) | refused | largest squared distance |",
        "|---|---|---|---|---|",
    ]
    for d in DIMENSIONS:
        refused, largest = gaussian_draws(d, n_draws, rng)
        lines.append(
            f"| {d} | {stats.chi2.isf(1e-6, d):.1f} | {log10_chi2_tail(DEFAULT_THRESHOLD, d):,.0f} | {refused} "
            f"| {largest:.1f} |"
        )
    refused_online = online_gaussian(1_000_000, rng)
    refused_stock, n_stock, largest_stock = stock_returns()
    best = timings(rng)
    lines += [
        "",
        f"`OnlineGMM` (estimated parameters, warm-up included) over 1,000,000 records of a two-component "
        f"mixture in d=10: **{refused_online} refused**.",
        f"Daily returns of DAX, SMI, CAC, FTSE 1991-98 (10-20 sd crash days), learned one by one "
        f"(K=2, full): **{refused_stock} of {n_stock:,} refused**, largest squared distance {largest_stock:.0f}.",
        "",
        '| d=10, K=8, full, batch 128 | guard on (`outliers="raise"`) | guard off (`"learn"`) | cost |',
        "|---|---|---|---|",
        f"| learn_many, 1024-record frames (us/record) | {best['many on']:.2f} | {best['many off']:.2f} "
        f"| {best['many on'] / best['many off'] - 1:+.0%} |",
        f"| learn_one (us/record) | {best['one on']:.2f} | {best['one off']:.2f} "
        f"| {best['one on'] / best['one off'] - 1:+.0%} |",
    ]
    body = "\n".join(lines)
    print(body)
    write_section("outliers", body)


if __name__ == "__main__":
    main()
