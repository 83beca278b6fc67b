"""MarkovSwitchingRegression against statsmodels' MarkovRegression: fit time at (at least) equal log-likelihood.

Run: `python benchmarks/markov_switching.py`. Writes the "markov_switching" section of BENCHMARKS.md.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
import warnings

import numpy as np
import statsmodels.api as sm
from statsmodels.tsa.regime_switching.tests.test_markov_regression import fedfunds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import write_section  # noqa: E402

import streamem as se  # noqa: E402

REPEATS = 5


def simulated(T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two regimes lasting 20 records on average, d = 2 regressors, a variance per regime."""
    coef = np.array([[0.5, -1.0], [-1.0, 2.0]])
    intercept = np.array([0.0, 1.0])
    sigma = np.array([0.5, 1.5])
    states = (np.cumsum(rng.random(T) < 0.05) % 2).astype(int)
    X = rng.normal(size=(T, 2))
    y = np.einsum("td,td->t", X, coef[states]) + intercept[states] + rng.normal(size=T) * sigma[states]
    return X, y


def median_time(fit) -> tuple[float, object]:
    """Median wall time of REPEATS fits (after one untimed fit: numba loads its compiled code, statsmodels warms)."""
    result = fit()
    times = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        result = fit()
        times.append(time.perf_counter() - began)
    return float(np.median(times)), result


FIRST_FIT = """
import time, warnings, numpy as np, streamem as se
from statsmodels.tsa.regime_switching.tests.test_markov_regression import fedfunds
f = np.asarray(fedfunds, dtype=float)
began = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    se.MarkovSwitchingRegression(2, switching_variance=False).fit(f[:-1, None], f[1:])
print(time.perf_counter() - began)
"""


def first_fit_in_a_new_process() -> float:
    """The first fit after `import streamem` in a fresh interpreter: numba loads its cached machine code then."""
    return float(subprocess.run([sys.executable, "-c", FIRST_FIT], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    f = np.asarray(fedfunds, dtype=float)
    X_sim, y_sim = simulated(5_000, np.random.default_rng(0))
    cases = [
        ("Fed funds AR(1), shared variance", f[:-1, None], f[1:], False),
        ("simulated, variance per regime", X_sim, y_sim, True),
    ]
    rows = []
    for name, X, y, switching in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statsmodels' optimiser warnings; our ConvergenceWarning is checked below
            sm_time, theirs = median_time(
                lambda: sm.tsa.MarkovRegression(y, k_regimes=2, exog=X, switching_variance=switching).fit(disp=False)  # noqa: B023
            )
            our_time, ours = median_time(
                lambda: se.MarkovSwitchingRegression(2, switching_variance=switching).fit(X, y)  # noqa: B023
            )
        rows.append(
            f"| {name} | {len(y):,} | {X.shape[1]} | {theirs.llf:.4f} | {ours.score(X, y):.4f} "
            f"| {ours.n_iter_}{'' if ours.converged_ else ' (not converged)'} | {sm_time * 1e3:.1f} "
            f"| {our_time * 1e3:.1f} | **{sm_time / our_time:.0f}x** |"
        )
        print(rows[-1], flush=True)
    body = (
        "## Markov-switching regression vs statsmodels `MarkovRegression`\n\n"
        "K = 2 regimes, every coefficient switching; default settings on both sides (statsmodels: `fit()`, EM\n"
        "warm-up then BFGS; streamem: Baum-Welch with `tol=1e-4` per record, one start). Wall time of `fit`,\n"
        f"median of {REPEATS} fits after one untimed fit. streamem's log-likelihood is at least statsmodels' in\n"
        "every row: its start distribution is free where statsmodels' is the chain's stationary one, which\n"
        "can only raise it (by up to -log of the start regime's stationary probability, 0.3-0.6 here; the\n"
        "Fed funds fit stops at `tol=1e-4` 0.03 below its converged -264.662). Goal: at least 10x faster at\n"
        "equal log-likelihood.\n\n"
        "| data | T | d | log-likelihood statsmodels | log-likelihood streamem | Baum-Welch iterations "
        "| ms statsmodels | ms streamem | speed-up |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    first = first_fit_in_a_new_process()
    body += (
        f"\n\nThe first fit in a new process also loads numba's compiled recursions from its on-disk cache: "
        f"{first * 1e3:.0f} ms\nfor the Fed funds fit (the cache itself is written once, at the first run after "
        "installing)."
    )
    write_section("markov_switching", body)


if __name__ == "__main__":
    main()
