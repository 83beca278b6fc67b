"""`streamem fit --model hmm` and `streamem check --model hmm`: regimes of a CSV file's rows in file order."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm

import streamem as se
from streamem.cli import build_parser
from streamem.state import StateError
from tests.conftest import DATA
from tests.test_plots import _check_png


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamem", *args], capture_output=True, text=True)


def sticky_chain(n: int, means: np.ndarray, stay: float, seed: int, scale: float = 1.0):
    """Records of a chain that stays in its state with probability `stay` (else jumps to another), and the states."""
    rng = np.random.default_rng(seed)
    K = len(means)
    states = np.empty(n, dtype=np.int64)
    state = 0
    leave, jumps = rng.random(n) > stay, rng.integers(1, K, n)
    for t in range(n):
        if leave[t]:
            state = (state + jumps[t]) % K
        states[t] = state
    return means[states] + scale * rng.normal(size=(n, means.shape[1])), states


def write_csv(path: pathlib.Path, frame: pd.DataFrame) -> pathlib.Path:
    frame.to_csv(path, index=False)
    return path


def forward_log_likelihood(log_b: np.ndarray, startprob: np.ndarray, transmat: np.ndarray) -> float:
    """log p(x_1..T) by the forward recursion in log space (NumPy/scipy, independent of the package's engine)."""
    alpha = np.log(startprob) + log_b[0]
    log_a = np.log(transmat)
    for t in range(1, len(log_b)):
        alpha = logsumexp(alpha[:, None] + log_a, axis=0) + log_b[t]
    return float(logsumexp(alpha))


@pytest.fixture(scope="module")
def stock_returns_csv(tmp_path_factory) -> pathlib.Path:
    """Daily log returns of DAX, SMI, CAC, FTSE 1991-98 in percent (1859 rows), as a CSV file."""
    prices = pd.read_csv(DATA / "eu_stock_markets.csv")[["DAX", "SMI", "CAC", "FTSE"]]
    returns = 100 * np.log(prices).diff().iloc[1:]
    return write_csv(tmp_path_factory.mktemp("eu") / "returns.csv", returns)


@pytest.fixture(scope="module")
def stock_fit(stock_returns_csv, tmp_path_factory):
    """`fit --model hmm --n-components 2` on the returns: (the command's result, its output directory)."""
    out = tmp_path_factory.mktemp("eu_fit") / "out"
    result = run("fit", str(stock_returns_csv), "--model", "hmm", "--n-components", "2", "--out", str(out))
    return result, out


def test_fit_keeps_the_mixture_as_its_default_model():
    """`fit` and `check` without --model fit a Gaussian mixture, as before --model existed."""
    parser = build_parser()
    assert parser.parse_args(["fit", "x.csv", "--out", "o"]).model == "gmm"
    assert parser.parse_args(["check", "x.csv"]).model == "gmm"
    assert parser.parse_args(["fit", "x.csv", "--out", "o", "--model", "hmm"]).model == "hmm"


def test_fit_hmm_on_stock_returns_finds_a_calm_and_a_volatile_regime_that_persist(stock_fit, stock_returns_csv):
    """K=2 on the four indices' returns: a volatile regime (covariance trace over twice the calm one's), both
    persistent (p_kk > 0.8, the calm one > 0.9), durations 1 / (1 - p_kk), the log-likelihood a NumPy forward
    pass gives with the written parameters, and at least hmmlearn's from its own starts."""
    result, out = stock_fit
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "model.json").read_text())
    assert document["family"] == "gaussian_hmm" and document["model"] == "hmm"
    assert document["n_states"] == document["n_components"] == 2 and document["n_samples"] == 1859
    assert document["features"] == ["DAX", "SMI", "CAC", "FTSE"] and document["covariance_type"] == "full"
    params = document["params"]
    transmat, startprob = np.array(params["transmat"]), np.array(params["startprob"])
    means, covariances = np.array(params["means"]), np.array(params["covariances"])
    np.testing.assert_allclose(transmat.sum(axis=1), 1.0, atol=1e-9)
    traces = np.trace(covariances, axis1=1, axis2=2)
    volatile, calm = int(np.argmax(traces)), int(np.argmin(traces))
    assert traces[volatile] > 2 * traces[calm]
    stay = np.diag(transmat)
    assert stay[calm] > 0.9 and stay[volatile] > 0.8
    np.testing.assert_allclose(document["expected_durations"], 1 / (1 - stay), rtol=1e-12)
    R = pd.read_csv(stock_returns_csv).to_numpy(float)
    log_b = np.column_stack([multivariate_normal(means[k], covariances[k]).logpdf(R) for k in range(2)])
    total = forward_log_likelihood(log_b, startprob, transmat)
    assert document["total_log_likelihood"] == pytest.approx(total, abs=1e-6)
    assert document["log_likelihood"] == pytest.approx(total / len(R), abs=1e-9)
    n_parameters = 1 + 2 + 2 * 4 + 2 * 10  # start, transitions, means, full covariances
    assert document["bic"] == pytest.approx(-2 * total + n_parameters * math.log(len(R)), abs=1e-6)
    hmmlearn = pytest.importorskip("hmmlearn.hmm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        references = [hmmlearn.GaussianHMM(2, "full", n_iter=500, tol=1e-6, random_state=s).fit(R) for s in range(3)]
    best = max(references, key=lambda reference: reference.score(R))
    assert total > best.score(R) - 0.01
    theirs = np.diag(best.transmat_)[np.argsort(np.trace(best.covars_, axis1=1, axis2=2))]
    np.testing.assert_allclose(stay[[calm, volatile]], theirs, atol=0.002)
    assert "2 states" in result.stdout and "expected durations" in result.stdout
    with pytest.raises(StateError, match="gaussian_hmm"):  # no warm start for a mixture
        se.OnlineGMM.from_fit(out / "model.json")
    # the numbers README.md quotes
    np.testing.assert_allclose(traces[[calm, volatile]], [2.08, 7.47], atol=0.01)
    np.testing.assert_allclose(stay[[calm, volatile]], [0.929, 0.843], atol=0.001)


def test_bic_picks_six_states_on_stock_returns(stock_returns_csv, tmp_path):
    """Over K = 1-8 (`--n-components auto`), BIC picks 6 states on the stock returns, as README.md says."""
    result = run("fit", str(stock_returns_csv), "--model", "hmm", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "model.json").read_text())["n_states"] == 6


def test_check_hmm_on_stock_returns_counts_what_the_readme_says(stock_returns_csv):
    """On the stock returns the online filter's most likely state switches more often than OnlineGMM's labels,
    and the regime announced at p >= 0.9 about as often as the batch Viterbi path (README.md's numbers)."""
    result = run("check", str(stock_returns_csv), "--model", "hmm")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    rates = {name: _number(text, name) for name in ["online HMM filter", "OnlineGMM labels", "batch HMM Viterbi"]}
    announced = _number(text, "online HMM, p >= 0.9")
    assert rates == pytest.approx({"online HMM filter": 204, "OnlineGMM labels": 126, "batch HMM Viterbi": 60}, abs=1)
    assert announced == pytest.approx(64, abs=1)


def test_fit_hmm_report_shows_regimes_transitions_and_durations(stock_fit):
    """report.md: the transition matrix and expected durations as tables, the series with regimes shaded."""
    result, out = stock_fit
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "model.json").read_text())
    report = (out / "report.md").read_text()
    transmat = document["params"]["transmat"]
    assert report.startswith("# Hidden Markov model fit of `returns.csv`")
    assert "| from \\ to | 0 | 1 |" in report
    assert f"| 0 | {transmat[0][0]:.4g} | {transmat[0][1]:.4g} |" in report
    durations = document["expected_durations"]
    assert f"| 1 | {document['params']['startprob'][1]:.4g} | {transmat[1][1]:.4g} | {durations[1]:.4g} |" in report
    assert "1 / (1 - p_kk)" in report and "| state | mean DAX | mean SMI | mean CAC | mean FTSE |" in report
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figures == ["log_likelihood.png", "regimes.png"]
    assert all(f"figures/{name}" in report for name in figures)
    _check_png(out / "figures" / "regimes.png")


def test_fit_hmm_chooses_the_number_of_states_by_bic(tmp_path):
    """On a three-state sticky chain, `--n-components 1-4` picks K=3 with the lowest BIC, each BIC in the report."""
    X, _ = sticky_chain(1500, np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]), 0.97, seed=1)
    data = write_csv(tmp_path / "chain.csv", pd.DataFrame(X, columns=["a", "b"]))
    result = run("fit", str(data), "--model", "hmm", "--n-components", "1-4", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 4  # progress: one line per K
    document = json.loads((tmp_path / "out" / "model.json").read_text())
    assert document["n_states"] == 3
    assert np.all(np.diag(document["params"]["transmat"]) > 0.94)
    report = (tmp_path / "out" / "report.md").read_text()
    table = report.split("| K | BIC | AIC |")[1].split("\n\n")[0].strip().splitlines()[1:]
    bics = {int(row.split("|")[1]): float(row.split("|")[2]) for row in table}
    assert list(bics) == [1, 2, 3, 4] and min(bics, key=bics.get) == 3
    assert bics[3] == pytest.approx(document["bic"], abs=0.05)
    assert "3 states chosen by BIC from K=1-4" in report
    assert (tmp_path / "out" / "figures" / "selection.png").exists()


def test_fit_hmm_refuses_missing_values_naming_the_line(tmp_path):
    """A hidden Markov model needs every row of its sequence: a missing value is refused (line, column, why),
    and so is --missing marginalize; nothing is written."""
    out = tmp_path / "out"
    result = run("fit", str(DATA / "airquality.csv"), "--columns", "Ozone,Wind", "--model", "hmm", "--out", str(out))
    assert result.returncode == 2
    assert "airquality.csv line 6, column 'Ozone': missing value" in result.stderr
    assert "one sequence" in result.stderr and "--missing marginalize" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not out.exists()
    marginalize = run(
        "fit", str(DATA / "airquality.csv"), "--model", "hmm", "--missing", "marginalize", "--out", str(out)
    )  # fmt: skip
    assert marginalize.returncode == 2 and "--missing marginalize" in marginalize.stderr and not out.exists()
    checked = run("check", str(DATA / "airquality.csv"), "--columns", "Ozone,Wind", "--model", "hmm")
    assert checked.returncode == 2 and "line 6, column 'Ozone': missing value" in checked.stderr


def test_fit_hmm_with_a_target_fits_a_markov_switching_regression(tmp_path):
    """`--target y --model hmm`: lines that switch every 150 records, found with their slopes, noise sds and a
    persistent chain; the log-likelihood is that of a NumPy forward pass with the written parameters."""
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 10, 1200)
    line = np.repeat(np.arange(8) % 2, 150)
    y = np.where(line == 0, 0.5 * x + 1, 1.5 * x - 2) + rng.normal(0, np.where(line == 0, 0.3, 0.6))
    data = write_csv(tmp_path / "lines.csv", pd.DataFrame({"x": x, "y": y}))
    out = tmp_path / "out"
    result = run("fit", str(data), "--target", "y", "--model", "hmm", "--n-components", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "model.json").read_text())
    assert document["family"] == "markov_switching_regression" and document["target"] == "y"
    params = document["params"]
    order = np.argsort(np.array(params["coef"])[:, 0])
    np.testing.assert_allclose(np.array(params["coef"])[order, 0], [0.5, 1.5], atol=0.03)
    np.testing.assert_allclose(np.array(params["intercept"])[order], [1.0, -2.0], atol=0.15)
    np.testing.assert_allclose(np.sqrt(params["noise_variance"])[order], [0.3, 0.6], atol=0.05)
    assert np.all(np.diag(params["transmat"]) > 0.97)
    log_b = np.column_stack([
        norm(params["coef"][k][0] * x + params["intercept"][k], math.sqrt(params["noise_variance"][k])).logpdf(y)
        for k in range(2)
    ])  # fmt: skip
    total = forward_log_likelihood(log_b, np.array(params["startprob"]), np.array(params["transmat"]))
    assert document["total_log_likelihood"] == pytest.approx(total, abs=1e-6)
    report = (out / "report.md").read_text()
    assert "| state | coef x | intercept | noise sd |" in report and "| from \\ to | 0 | 1 |" in report
    _check_png(out / "figures" / "regimes.png")


def _number(text: str, label: str) -> float:
    return float(text.split(label)[1].split()[0])


def test_check_hmm_compares_the_online_model_with_baum_welch_and_counts_switches(tmp_path):
    """`check --model hmm` on a sticky chain of overlapping regimes: transition and mean gaps to batch Baum-Welch
    are small, and the online filter switches regimes far less often than OnlineGMM's labels (about as often as
    the chain: 1,000 * (1 - 0.99) = 10 per 1,000 records; with the consumer's 0.9 threshold, no more often)."""
    X, _ = sticky_chain(10_000, np.array([[0.0, 0.0], [2.0, 2.0]]), 0.99, seed=2)
    data = write_csv(tmp_path / "chain.csv", pd.DataFrame(X, columns=["a", "b"]))
    result = run("check", str(data), "--model", "hmm", "--n-components", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert _number(text, "largest transition gap:") < 0.01
    assert _number(text, "largest mean gap:") < 0.1
    online, mixture = _number(text, "online HMM filter"), _number(text, "OnlineGMM labels")
    assert 5 < online < 20 and mixture > 3 * online
    assert 5 < _number(text, "online HMM, p >= 0.9") <= online  # what `run --model hmm` would announce
    assert abs(_number(text, "log-likelihood gap / rec:")) < 0.01
    _check_png(tmp_path / "out" / "regimes.png")
