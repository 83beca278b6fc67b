"""`streamem fit` and `streamem check`: model selection, files written, warm start, errors."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import streamem as se
from streamem.report import read_table
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
    assert refused.returncode == 2 and "missing value" in refused.stderr


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


def _faithful_with_a_stray_cell(tmp_path, row: int = 10):
    """faithful.csv with `?` as the `waiting` of data row `row` (file line row + 1, the header being line 1)."""
    lines = (DATA / "faithful.csv").read_text().splitlines()
    eruptions, _ = lines[row].split(",")
    lines[row] = f"{eruptions},?"
    path = tmp_path / "faithful.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_stray_text_cell_fails_naming_the_file_line_and_column(tmp_path):
    """One `?` in a numeric column: exit 2 naming file, line and column; the column is not dropped silently."""
    data = _faithful_with_a_stray_cell(tmp_path, row=10)
    result = run("fit", str(data), "--n-components", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout
    assert "faithful.csv line 11, column 'waiting': '?' is not a number" in result.stderr
    assert "--na-values" in result.stderr  # the way out is named
    assert not (tmp_path / "out").exists()


def test_na_values_treats_a_stray_cell_as_missing(tmp_path):
    """`--na-values ?` reads `?` as missing: an error suggesting --missing marginalize, or a fit with it."""
    data = _faithful_with_a_stray_cell(tmp_path, row=10)
    refused = run("fit", str(data), "--n-components", "2", "--na-values", "?", "--out", str(tmp_path / "no"))
    assert refused.returncode == 2
    assert "line 11, column 'waiting': missing value" in refused.stderr
    assert "--missing marginalize" in refused.stderr
    fitted = run(
        "fit", str(data), "--n-components", "2", "--na-values", "?", "--missing", "marginalize",
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    document = json.loads((tmp_path / "out" / "model.json").read_text())
    assert document["features"] == ["eruptions", "waiting"] and document["n_samples"] == 272
    assert "1 missing value (0.2% of cells: waiting 1)" in (tmp_path / "out" / "report.md").read_text()


def test_missing_values_without_marginalize_name_the_line_and_suggest_it(tmp_path):
    """airquality's empty Ozone cells: the error names the first one's line and column and --missing marginalize."""
    result = run("fit", str(DATA / "airquality.csv"), "--columns", "Ozone,Wind", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "airquality.csv line 6, column 'Ozone': missing value" in result.stderr
    assert "use --missing marginalize" in result.stderr


def test_report_tables_warnings_and_progress(tmp_path):
    """report.md: parameters as tables with 4 significant digits, a warning when BIC picks the largest K searched;
    progress in a pipe is one line per K (no carriage returns)."""
    result = run("fit", str(DATA / "faithful.csv"), "--n-components", "1-2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and len(result.stderr.strip().splitlines()) == 2
    report = (tmp_path / "report.md").read_text()
    document = json.loads((tmp_path / "model.json").read_text())
    assert "```json" not in report and len(report.splitlines()) < 60
    weights = document["params"]["weights"]
    means = document["params"]["means"]
    assert f"| 0 | {weights[0]:.4g} | {means[0][0]:.4g} | {means[0][1]:.4g} |" in report
    assert "| component | weight | mean eruptions | mean waiting |" in report
    assert "BIC chose K=2, the largest K searched" in report
    assert "no missing values" in report
    calm = run("fit", str(DATA / "faithful.csv"), "--n-components", "1-4", "--out", str(tmp_path / "calm"))
    assert calm.returncode == 0 and "largest K searched" not in (tmp_path / "calm" / "report.md").read_text()


def test_figures_name_the_features_on_their_axes(faithful):
    """The 1-D mixture, responsibilities, regression and online figures label their axes with the feature names."""
    from streamem import plots

    model = se.GaussianMixture(2, random_state=0).fit(faithful[:, :1])
    figure = plots.mixture_1d(model, faithful[:, 0], name="eruptions")
    assert figure.axes[0].get_xlabel() == "eruptions"
    figure = plots.responsibilities(model, faithful[:, :1], name="eruptions")
    assert figure.axes[0].get_ylabel() == "record (eruptions)"
    X, y = seed_example_two(300, np.random.default_rng(0))
    lines = se.RegressionMixture(2, random_state=0).fit(X, y)
    figure = plots.regression_lines(lines, X, y, names=("dose",), target="response")
    assert (figure.axes[0].get_xlabel(), figure.axes[0].get_ylabel()) == ("dose", "response")
    history = [(n, [0.5, 0.5], [[0.0], [5.0]]) for n in range(0, 1000, 100)]
    assert plots.online_trace(history, name="eruptions").axes[1].get_ylabel() == "mean eruptions"


def _faithful_with(tmp_path, column_text=None, cell=None) -> pathlib.Path:
    """faithful.csv, with an extra column of `column_text` cells, or `cell` as data row 10's `waiting`."""
    lines = (DATA / "faithful.csv").read_text().splitlines()
    if column_text is not None:
        lines = [lines[0] + ",empty"] + [line + "," + column_text for line in lines[1:]]
    if cell is not None:
        lines[10] = lines[10].split(",")[0] + "," + cell
    path = tmp_path / "data.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("missing", ["error", "marginalize"])
def test_an_entirely_empty_column_is_refused_naming_it(tmp_path, missing):
    """A column with no value at all used to be left out silently while report.md said "There are no missing
    values": refused, naming the column, its missing cells, and how to leave it out."""
    data = _faithful_with(tmp_path, column_text="")
    result = run("fit", str(data), "--n-components", "2", "--missing", missing, "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "column 'empty' has no values (272 missing cells)" in result.stderr, result.stderr
    assert "--columns eruptions,waiting" in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_file_that_is_not_utf8_is_named():
    """A byte that is not UTF-8 names the file (was the bare "'utf-8' codec can't decode byte 0xff ...")."""
    data = pathlib.Path(DATA / "faithful.csv").read_bytes().replace(b"3.6", b"3\xff6", 1)
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "bad.csv"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"bad\.csv: not UTF-8 text \(byte 0xff on line 2\)"):
            read_table(path)


def test_a_value_too_large_for_em_names_its_line_and_column(tmp_path):
    """1e308 is a float, but its square overflows: one line naming the line, column and value, no RuntimeWarning
    (was two RuntimeWarning lines and "full covariances must be finite square matrices")."""
    data = _faithful_with(tmp_path, cell="1e308")
    result = run("fit", str(data), "--n-components", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("streamem fit: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert "data.csv line 11, column 'waiting': 1e308 is too large" in result.stderr, result.stderr


def test_fit_out_naming_a_file_is_one_line(tmp_path):
    """`fit --out` naming an existing file: exit 2 and one line (was a NotADirectoryError traceback)."""
    taken = tmp_path / "taken"
    taken.write_text("not a directory\n")
    result = run("fit", str(DATA / "faithful.csv"), "--n-components", "2", "--out", str(taken))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"streamem fit: --out {taken} is a file, not a directory"], result.stderr
