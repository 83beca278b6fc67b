"""The online hidden Markov models: speed, agreement with batch Baum-Welch, and what the defaults rest on.

Run: `python benchmarks/online_hmm.py` (or `make bench`). Writes the "online-hmm" section of
BENCHMARKS.md:

- records/s of `OnlineGaussianHMM.learn_one` (d = 1, K = 2) and `learn_many` (d = 10, K = 4, full,
  1024-record frames), default settings, with `OnlineMarkovSwitchingRegression` beside them;
- the online model's distance from batch Baum-Welch on a long sticky stream, by block size
  (`batch_size`) and step decay (`alpha`): what the defaults are chosen from;
- real data, the daily log returns of four European stock indices (1991-98): the one-step
  predictive log density of each day given the days before (prequential, after the warm-up) and
  the regime switches a year, against `OnlineGMM` on the same days.
"""

from __future__ import annotations

import pathlib
import sys
import time
import warnings

import numpy as np
import pandas as pd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

import streamem as se  # noqa: E402
from streamem.schedules import StepSize  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "eu_stock_markets.csv"
REPEATS = 5


def sticky(n: int, means: np.ndarray, stay: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    K = len(means)
    states = np.empty(n, dtype=np.int64)
    leave, jumps = rng.random(n) > stay, rng.integers(1, K, n)
    state = 0
    for t in range(n):  # data generation only
        if leave[t]:
            state = (state + jumps[t]) % K
        states[t] = state
    return means[states] + rng.normal(size=(n, means.shape[1])), states


def median_rate(run, n: int) -> float:
    rates = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        run()
        rates.append(n / (time.perf_counter() - began))
    return float(np.median(rates))


def speed(rng: np.random.Generator) -> list[str]:
    X1, _ = sticky(60_500, np.array([[0.0], [3.0]]), 0.98, rng)
    records = [{"x": v} for v in X1[:, 0].tolist()]
    targets = (2.0 * X1[:, 0] + rng.normal(size=len(X1))).tolist()

    def learn_one_hmm():
        model = se.OnlineGaussianHMM(2, seed=0)
        for x in records[:500]:
            model.learn_one(x)
        learn_one_hmm.began = time.perf_counter()
        for x in records[500:]:
            model.learn_one(x)

    def timed_after_warm_up(make, learn) -> float:
        rates = []
        for _ in range(REPEATS):
            model = make()
            learn(model, 0, 500)
            began = time.perf_counter()
            learn(model, 500, len(records))
            rates.append((len(records) - 500) / (time.perf_counter() - began))
        return float(np.median(rates))

    def one_hmm(model, start, stop):
        for x in records[start:stop]:
            model.learn_one(x)

    def one_msr(model, start, stop):
        for x, y in zip(records[start:stop], targets[start:stop], strict=True):
            model.learn_one(x, y)

    hmm_one = timed_after_warm_up(lambda: se.OnlineGaussianHMM(2, seed=0), one_hmm)
    msr_one = timed_after_warm_up(lambda: se.OnlineMarkovSwitchingRegression(2, seed=0), one_msr)
    means = rng.normal(0.0, 3.0, (4, 10))
    X10, _ = sticky(1024 * 200, means, 0.98, rng)
    frames = [pd.DataFrame(X10[i : i + 1024], columns=[f"f{j}" for j in range(10)]) for i in range(0, len(X10), 1024)]
    y10 = X10 @ rng.normal(size=10) + rng.normal(size=len(X10))
    targets10 = [pd.Series(y10[i : i + 1024]) for i in range(0, len(X10), 1024)]

    def many(make, with_target: bool) -> float:
        rates = []
        for _ in range(REPEATS):
            model = make()
            model.learn_many(frames[0], targets10[0]) if with_target else model.learn_many(frames[0])
            began = time.perf_counter()
            for frame, target in zip(frames[1:], targets10[1:], strict=True):
                model.learn_many(frame, target) if with_target else model.learn_many(frame)
            rates.append(1024 * (len(frames) - 1) / (time.perf_counter() - began))
        return float(np.median(rates))

    hmm_many = many(lambda: se.OnlineGaussianHMM(4, seed=0), False)
    msr_many = many(lambda: se.OnlineMarkovSwitchingRegression(4, seed=0), True)
    return [
        f"| learn_one, d=1, K=2 | {hmm_one:,.0f} | {msr_one:,.0f} | 50,000 |",
        f"| learn_many, d=10, K=4, full, 1024-record DataFrames | {hmm_many:,.0f} | {msr_many:,.0f} | 300,000 |",
    ]


def agreement(rng: np.random.Generator) -> list[str]:
    means = np.array([[0.0, 0.0], [2.5, 0.0], [0.0, 2.5]])
    X, _ = sticky(100_000, means, 0.97, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se.ConvergenceWarning)
        batch = se.GaussianHMM(3, random_state=0).fit(X)
    rows = []
    for batch_size in (32, 64, 128, 256, 512):
        for alpha in (0.6, 0.8, 1.0):
            model = se.OnlineGaussianHMM(3, batch_size=batch_size, step=StepSize(alpha=alpha), features=("a", "b"),
                                         seed=0)
            model.learn_many(X)
            order = [int(np.argmin(((model.means_ - m) ** 2).sum(axis=1))) for m in batch.means_]
            mean_gap = np.abs(model.means_[order] - batch.means_).max()
            transition_gap = np.abs(model.transmat_[np.ix_(order, order)] - batch.transmat_).max()
            rows.append(f"| {batch_size} | {alpha} | {mean_gap:.4f} | {transition_gap:.4f} |")
    return rows


def real_data() -> list[str]:
    prices = pd.read_csv(DATA)
    returns = np.log(prices).diff().dropna() * 100  # percent a day
    days_a_year = 260
    rows = []
    candidates = [("OnlineGMM", lambda: se.OnlineGMM(2, warmup=500, seed=0))]
    for batch_size in (32, 64, 128):
        candidates.append(
            (f"OnlineGaussianHMM, batch_size={batch_size}", lambda b=batch_size: se.OnlineGaussianHMM(2, batch_size=b,
                                                                                                     seed=0))
        )
    records = returns.to_dict("records")
    for name, make in candidates:
        model = make()
        scores, labels, announced, regime = [], [], 0, None
        for t, x in enumerate(records):
            if t >= 500:
                scores.append(model.score_one(x))
                probabilities = model.predict_proba_one(x)
                label = max(probabilities, key=probabilities.get)
                labels.append(label)
                if probabilities[label] >= 0.9 and label != regime:  # as the consumer's regime_change records
                    announced += regime is not None
                    regime = label
            model.learn_one(x)
        years = len(labels) / days_a_year
        switches = int((np.diff(labels) != 0).sum()) / years
        rows.append(f"| {name} | {np.mean(scores):.4f} | {switches:.1f} | {announced / years:.1f} |")
    return rows


def main() -> None:
    rng = np.random.default_rng(0)
    se.OnlineGaussianHMM(2, warmup=20, batch_size=8).learn_many(pd.DataFrame({"a": rng.normal(size=40)}))  # compile
    speed_rows = speed(rng)
    print("\n".join(speed_rows), flush=True)
    agreement_rows = agreement(rng)
    print("\n".join(agreement_rows), flush=True)
    real_rows = real_data()
    print("\n".join(real_rows), flush=True)
    body = (
        "## Online hidden Markov models\n\n"
        f"Records/s, median of {REPEATS} runs, default settings (`batch_size=128`, `StepSize()`, `warmup=500`; the\n"
        "warm-up not timed).\n\n"
        "| case | OnlineGaussianHMM | OnlineMarkovSwitchingRegression | goal |\n|---|---|---|---|\n"
        + "\n".join(speed_rows)
        + "\n\nDistance from batch Baum-Welch on the same 100,000 records of a three-state sticky chain (stays with\n"
        "probability 0.97; means 2.5 apart, unit variances): the largest gap of a mean and of a transition\n"
        "probability, by block size and step decay. The defaults (128, 0.8) sit in the flat part.\n\n"
        "| batch_size | alpha | mean gap | transition gap |\n|---|---|---|---|\n"
        + "\n".join(agreement_rows)
        + "\n\nDaily log returns (%) of DAX, SMI, CAC and FTSE, 1991-98 (1,859 days, two states, full covariances,\n"
        "the first 500 days the warm-up): the mean one-step predictive log density of each later day given the\n"
        "days before it (`score_one` before `learn_one`; higher is better), how often the most likely label\n"
        "changes, and how often it changes to one held with probability >= 0.9 (what the consumer announces).\n\n"
        "| model | log density per day | label changes a year | changes at p >= 0.9 a year |\n|---|---|---|---|\n"
        + "\n".join(real_rows)
    )
    write_section("online-hmm", body)


if __name__ == "__main__":
    main()
