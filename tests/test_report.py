"""`streamem fit` and `streamem check`: model selection, files written, warm start, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import streamem as se
from tests.conftest import DATA, seed_example_two


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamem", *args], capture_output=True, text=True)


def test_fit_auto_picks_two_components_on_old_faithful_and_writes_the_report(tmp_path):
    """`fit --components auto` chooses K=2 by BIC and writes model.json, report.md and PNG figures."""
    result = run("fit", str(DATA / "faithful.csv"), "--components", "auto", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "K=8" in result.stderr  # progress, one line per K
    document = json.loads((tmp_path / "model.json").read_text())
    assert document["n_components"] == 2 and document["features"] == ["eruptions", "waiting"]
    reference = se.GaussianMixture(2, n_init=3, random_state=0).fit(
        np.loadtxt(DATA / "faithful.csv", delimiter=",", skiprows=1)
    )
    assert document["log_likelihood"] == pytest.approx(reference.lower_bound_, abs=1e-6)
    figures = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figures == ["log_likelihood.png", "mixture.png", "responsibilities.png", "selection.png"]
    report = (tmp_path / "report.md").read_text()
    assert all(f"figures/{name}" in report for name in figures)


def test_fit_json_warm_starts_the_online_model(tmp_path):
    """OnlineGMM.from_fit(model.json) starts with the batch parameters and keeps learning."""
    assert run("fit", str(DATA / "faithful.csv"), "--components", "2", "--out", str(tmp_path)).returncode == 0
    online = se.OnlineGMM.from_fit(tmp_path / "model.json", batch_size=16)
    document = json.loads((tmp_path / "model.json").read_text())
    np.testing.assert_allclose(online.means_, document["params"]["means"], rtol=1e-6)
    before = online.n_seen
    online.learn_one({"eruptions": 3.0, "waiting": 70.0})
    assert online.is_warm and online.n_seen == before + 1
    with pytest.raises(se.state.StateError, match="gaussian mixture, not a regression"):
        se.OnlineRegressionMixture.from_fit(tmp_path / "model.json")


def test_fit_with_a_target_and_missing_values(tmp_path):
    """--target fits regression lines (seed example 2); --missing marginalize fits the air-quality NAs."""
    X, y = seed_example_two(1500, np.random.default_rng(0))
    data = tmp_path / "lines.csv"
    data.write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in zip(X[:, 0], y)))
    assert (
        run("fit", str(data), "--target", "y", "--components", "1-3", "--out", str(tmp_path / "lines")).returncode == 0
    )
    lines = json.loads((tmp_path / "lines" / "model.json").read_text())
    assert lines["n_components"] == 2
    assert sorted(round(c[0], 1) for c in lines["params"]["coef"]) == [0.5, 1.5]
    online = se.OnlineRegressionMixture.from_fit(tmp_path / "lines" / "model.json")
    assert online.predict_one({"x": 4.0}) == pytest.approx(float(np.mean([0.5 * 4 + 1, 1.5 * 4 + 2])), abs=0.2)
    air = run(
        "fit",
        str(DATA / "airquality.csv"),
        "--columns",
        "Ozone,Solar.R,Wind,Temp",
        "--components",
        "2",
        "--missing",
        "marginalize",
        "--out",
        str(tmp_path / "air"),
    )
    assert air.returncode == 0, air.stderr
    refused = run("fit", str(DATA / "airquality.csv"), "--columns", "Ozone,Wind", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2 and "NaN value" in refused.stderr


def test_check_prints_the_consistency_report():
    """`check` streams the file through the online model and compares it with batch EM."""
    result = run("check", str(DATA / "faithful.csv"), "--passes", "10")
    assert result.returncode == 0, result.stderr
    gap = float(result.stdout.split("largest mean gap:")[1].split()[0])
    assert gap < 0.1
    assert "log-likelihood gap" in result.stdout


def test_fit_errors_are_short_and_precise(tmp_path):
    """A missing file or column gives exit status 2 and one line saying what is wrong."""
    assert "No such file" in run("fit", "nope.csv", "--out", str(tmp_path)).stderr
    result = run("fit", str(DATA / "faithful.csv"), "--columns", "eruptions,nope", "--out", str(tmp_path))
    assert result.returncode == 2 and "column 'nope' is not in" in result.stderr
