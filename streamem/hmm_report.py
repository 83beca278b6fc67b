"""`streamem fit --model hmm` and `streamem check --model hmm`: hidden Markov models of a CSV file's rows.

The rows, in file order, are one sequence. `fit_hmm_table` fits `GaussianHMM` (or, with a target,
`MarkovSwitchingRegression`) for each K tried, keeps the lowest BIC, and writes model.json, figures and
report.md as `streamem fit` does for mixtures; `check_hmm_table` streams the rows through
`OnlineGaussianHMM` and compares it with batch Baum-Welch and with `OnlineGMM`'s labels.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import warnings

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from streamem import plots
from streamem.exceptions import ConvergenceWarning
from streamem.gaussian_hmm import GaussianHMM
from streamem.markov_switching import MarkovSwitchingRegression
from streamem.report import (
    FIT_FORMAT,
    Table,
    full_covariances,
    markdown_table,
    missing_line,
    number_text,
    parse_components,
    print_progress,
    read_table,
    require_plots,
)

__all__ = ["HMMConsistencyReport", "check_hmm_table", "fit_hmm_table", "hmm_document"]

# Why a missing value stops `--model hmm` (a mixture's error suggests --missing marginalize instead).
HMM_MISSING_ADVICE = (
    "--model hmm reads the rows as one sequence and needs every value (dropping a row would make its neighbours "
    "consecutive); fill the gaps, or leave the column out with --columns"
)


# Baum-Welch's stopping rule for `fit --model hmm` (change of the log-likelihood per record): the likelihood is
# flat along the persistence p_kk, so the estimators' default 1e-4 can stop well short of it (four stock indices'
# daily returns, K=2: volatile p_kk 0.819 against 0.844 at the optimum hmmlearn reaches); a few more iterations.
HMM_TOL = 1e-7

# The filtered probability at which `streamem run --model hmm` announces a regime change (its default).
REGIME_THRESHOLD = 0.9
HMM_MAX_ITER = 1000


def _read(path, columns, target, na_values, missing: str) -> Table:
    if missing != "error":
        raise ValueError(
            "--missing marginalize is for mixtures: --model hmm reads the rows as one sequence and needs every value"
        )
    return read_table(path, columns, target, na_values=na_values, missing="error", missing_advice=HMM_MISSING_ADVICE)


def fit_hmm_table(
    path,
    out_dir,
    *,
    components="auto",
    covariance_type: str = "full",
    target: str | None = None,
    columns: list[str] | None = None,
    missing: str = "error",
    na_values=(),
    n_init: int = 3,
    seed: int = 0,
    progress=sys.stderr,
) -> dict:
    """Fit a hidden Markov model to the file's rows (one sequence, in file order) for each K in `components`,
    keep the lowest BIC, and write model.json, figures and report.md into `out_dir` (created only after every
    check passed). With `target`, a Markov-switching regression of it on the other columns."""
    require_plots()
    candidates = parse_components(components)
    if pathlib.Path(out_dir).exists() and not pathlib.Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    table = _read(path, columns, target, na_values, missing)
    X, names, y = table.X, table.names, table.y
    if len(X) < max(candidates):
        raise ValueError(f"{path} has {len(X)} records: too few for {max(candidates)} states")
    data = (X,) if y is None else (X, y)
    fits, bics, aics = [], [], []
    stopping = {"tol": HMM_TOL, "max_iter": HMM_MAX_ITER}
    for i, K in enumerate(candidates, start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the document and report say whether it converged
            if y is None:
                model = GaussianHMM(
                    K, covariance_type=covariance_type, n_init=n_init, random_state=seed, **stopping
                ).fit(X)
            else:
                model = MarkovSwitchingRegression(K, n_init=n_init, random_state=seed, **stopping).fit(X, y)
        fits.append(model)
        bics.append(model.bic(*data))
        aics.append(model.aic(*data))
        print_progress(progress, i, candidates, K, bics[-1], model.n_iter_)
    model = fits[int(np.argmin(bics))]
    document = hmm_document(model, names, X, y, target=target)
    out = pathlib.Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(document, indent=1))
    path_of_states = model.predict(*data)
    figures = [plots.save(plots.log_likelihood_trace(model, n_records=len(X)), out / "figures" / "log_likelihood.png")]
    if len(candidates) > 1:
        figures.append(plots.save(plots.selection(candidates, bics, aics), out / "figures" / "selection.png"))
    series, labels = (X, names) if y is None else (np.column_stack([y, X]), [target, *names])
    figure = plots.regimes(series, path_of_states, names=labels, title="Series with regimes shaded (Viterbi path)")
    figures.append(plots.save(figure, out / "figures" / "regimes.png"))
    _write_report(out, path, document, figures, candidates, bics, aics, table)
    return document


def hmm_document(model, names, X, y=None, *, target: str | None = None) -> dict:
    """A fitted `GaussianHMM` / `MarkovSwitchingRegression` as the JSON document `streamem fit --model hmm`
    writes: the chain and emission parameters, log-likelihood (per record and total), BIC, AIC, each state's
    expected duration 1 / (1 - p_kk) (null when p_kk = 1) and its share of the Viterbi path."""
    data = (X,) if y is None else (X, y)
    total = model.score(*data)
    transmat = np.asarray(model.transmat_)
    stay = np.diag(transmat)
    K = len(stay)
    path = model.predict(*data)
    if y is None:
        family = "gaussian_hmm"
        emissions = {"means": model.means_, "covariances": model.covariances_}
    else:
        family = "markov_switching_regression"
        emissions = {"coef": model.coef_, "intercept": model.intercept_, "noise_variance": model.noise_variance_}
    document = {
        "format": FIT_FORMAT,
        "version": 1,
        "model": "hmm",
        "family": family,
        "features": list(names),
        "target": target,
        "n_components": K,
        "n_states": K,
        "n_samples": int(len(X)),
        "log_likelihood": float(total / len(X)),
        "total_log_likelihood": float(total),
        "bic": float(model.bic(*data)),
        "aic": float(model.aic(*data)),
        "converged": bool(model.converged_),
        "n_iter": int(model.n_iter_),
        "params": {
            "startprob": np.asarray(model.startprob_).tolist(),
            "transmat": transmat.tolist(),
            **{name: np.asarray(value).tolist() for name, value in emissions.items()},
        },
        "expected_durations": [None if p >= 1.0 else float(1.0 / (1.0 - p)) for p in stay],
        "occupancy": (np.bincount(path, minlength=K) / len(path)).tolist(),
        "switches": int((np.diff(path) != 0).sum()),
    }
    if y is None:
        document["covariance_type"] = model.covariance_type
    else:
        document["switching_variance"] = bool(model.switching_variance)
    return document


def _duration(value) -> str:
    return "inf" if value is None else number_text(value)


def _emission_tables(document: dict) -> list[str]:
    """Each state's emission parameters as markdown tables (model.json keeps them at full precision)."""
    params, names, K = document["params"], document["features"], document["n_states"]
    if document["family"] == "markov_switching_regression":
        header = ["state", *(f"coef {n}" for n in names), "intercept", "noise sd"]
        rows = [
            [
                str(k),
                *map(number_text, params["coef"][k]),
                number_text(params["intercept"][k]),
                number_text(np.sqrt(params["noise_variance"][k])),
            ]
            for k in range(K)
        ]
        return markdown_table(header, rows)
    kind = document["covariance_type"]
    covariances = full_covariances(kind, np.asarray(params["covariances"]), K, len(names))
    sds = np.sqrt(np.einsum("kii->ki", covariances))
    traces = np.einsum("kii->k", covariances)
    lines = markdown_table(
        ["state", *(f"mean {n}" for n in names)], [[str(k), *map(number_text, params["means"][k])] for k in range(K)]
    )
    lines += ["", f"Standard deviations ({kind} covariance) and the covariance trace (the state's total variance):", ""]
    lines += markdown_table(
        ["state", *(f"sd {n}" for n in names), "trace"],
        [[str(k), *map(number_text, sds[k]), number_text(traces[k])] for k in range(K)],
    )
    if kind in ("full", "tied") and len(names) > 1:
        for k in range(1) if kind == "tied" else range(K):
            correlation = covariances[k] / np.outer(sds[k], sds[k])
            lines += ["", f"Correlations, {'all states' if kind == 'tied' else f'state {k}'}:", ""]
            lines += markdown_table(["", *names], [[n, *map(number_text, correlation[i])] for i, n in enumerate(names)])
    return lines


def _write_report(out: pathlib.Path, source, document, figures, candidates, bics, aics, table: Table) -> None:
    K, n = document["n_states"], document["n_samples"]
    regression = document["family"] == "markov_switching_regression"
    what = f"{n} records in file order (one sequence), features {', '.join(document['features'])}"
    if document["target"]:
        what += f", target {document['target']}"
    what += (
        f"; {K} states chosen by BIC from K={candidates[0]}-{candidates[-1]}."
        if len(candidates) > 1
        else (f"; {K} states.")
    )
    lines = [
        f"# Hidden Markov model fit of `{pathlib.Path(source).name}`",
        "",
        f"{'Markov-switching regression' if regression else 'Gaussian hidden Markov model'}: {what}",
        f"Log-likelihood per record {document['log_likelihood']:.4f} (total {document['total_log_likelihood']:.1f}), "
        f"BIC {document['bic']:.1f}, AIC {document['aic']:.1f}, "
        f"{'converged' if document['converged'] else 'NOT converged'} after {document['n_iter']} Baum-Welch "
        "iterations.",
        missing_line(table),
    ]
    if table.skipped:
        lines.append(f"Text columns left out: {', '.join(table.skipped)}.")
    if len(candidates) > 1 and K == candidates[-1]:
        lines += [
            "",
            f"**Warning:** BIC chose K={K}, the largest K searched: a larger K may fit better. "
            f"Search further, e.g. `--n-components {candidates[0]}-{2 * K}`.",
        ]
    criteria = [[str(k), f"{b:.1f}", f"{a:.1f}"] for k, b, a in zip(candidates, bics, aics, strict=True)]
    lines += ["", *markdown_table(["K", "BIC", "AIC"], criteria)]
    params = document["params"]
    transmat = params["transmat"]
    lines += [
        "",
        "## Regimes",
        "",
        "p_kk is the probability that state k stays from one record to the next; its expected duration is "
        "1 / (1 - p_kk) records. The share of records is that of the most likely path (Viterbi).",
        "",
        *markdown_table(
            ["state", "start prob", "p_kk", "expected duration (records)", "share of records"],
            [
                [
                    str(k),
                    number_text(params["startprob"][k]),
                    number_text(transmat[k][k]),
                    _duration(document["expected_durations"][k]),
                    number_text(document["occupancy"][k]),
                ]
                for k in range(K)
            ],
        ),  # fmt: skip
        "",
        f"The most likely path switches regime {document['switches']} times "
        f"({1000 * document['switches'] / n:.3g} per 1,000 records).",
        "",
        "Transition matrix (row: from, column: to):",
        "",
        *markdown_table(
            ["from \\ to", *map(str, range(K))], [[str(k), *map(number_text, transmat[k])] for k in range(K)]
        ),
        "",
        "## Parameters",
        "",
        *_emission_tables(document),
        "",
        *(f"![{p.stem}](figures/{p.name})" for p in figures),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class HMMConsistencyReport:
    """How far `OnlineGaussianHMM`, fed a file as a stream, is from batch Baum-Welch on the whole file, and how
    often each model's regime label changes.

    Attributes
    ----------
    matching
        `matching[k]` is the batch state matched to online state k (Hungarian assignment on the means).
    transition_gap
        Largest |P_online - P_batch| over the matched transition matrices' entries.
    mean_gap
        Largest Euclidean distance between matched means.
    covariance_gap
        Largest Frobenius norm of the difference of matched covariances.
    log_likelihood_gap
        log p(file) per record under the online parameters minus under the batch ones.
    first_row, n_rows
        The rows (0-based; passes after the first count again) whose labels are compared: from the first
        one both online models answered after their warm-ups.
    switches
        Label changes per 1,000 of those rows: the online filter's most likely state, the regime `streamem run
        --model hmm` announces from it (most likely state held with probability >= its --regime-threshold,
        0.9), `OnlineGMM`'s labels (each answered before it was learned), and the batch model's filter and
        Viterbi path.
    """

    matching: tuple[int, ...]
    transition_gap: float
    mean_gap: float
    covariance_gap: float
    log_likelihood_gap: float
    first_row: int
    n_rows: int
    switches: dict[str, float]

    def __str__(self) -> str:
        lines = [
            f"states matched (online -> batch): {list(self.matching)}",
            f"largest transition gap:    {self.transition_gap:.6f}",
            f"largest mean gap:          {self.mean_gap:.6f}",
            f"largest covariance gap:    {self.covariance_gap:.6f}",
            f"log-likelihood gap / rec:  {self.log_likelihood_gap:+.6f} nats",
            f"regime switches per 1,000 records ({self.n_rows} records from row {self.first_row}, file order):",
        ]
        return "\n".join([*lines, *(f"  {name:<22} {rate:.2f}" for name, rate in self.switches.items())])


def _per_thousand(labels: np.ndarray) -> float:
    return 1000.0 * float((np.diff(labels) != 0).sum()) / max(len(labels), 1)


def _announced(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """The regime `streamem run --model hmm` announces after each row: the most likely state once it is held
    with probability >= `threshold`, else the one announced before (-1 before the first)."""
    likely = probabilities.argmax(axis=1)
    held = probabilities[np.arange(len(likely)), likely] >= threshold
    announced = pd.Series(np.where(held, likely, np.nan)).ffill().fillna(-1)
    return announced.to_numpy(dtype=np.int64)


def check_hmm_table(
    path,
    *,
    components: int = 2,
    covariance_type: str = "full",
    columns=None,
    batch_size: int = 64,
    warmup: int | None = None,
    passes: int = 1,
    seed: int = 0,
    out_dir=None,
    missing: str = "error",
    na_values=(),
) -> HMMConsistencyReport:
    """Stream the file's rows (in file order, `passes` times, one sequence) through `OnlineGaussianHMM` and
    `OnlineGMM` with the same warm-up and batch size, fit `GaussianHMM` to the whole file, and compare
    (`HMMConsistencyReport`); `out_dir` gets regimes.png, the online filter's regimes from the first
    answered row of the first pass on (in the batch model's state numbers)."""
    from streamem.online_gmm import OnlineGMM
    from streamem.online_hmm import OnlineGaussianHMM

    if out_dir is not None:
        require_plots()
    table = _read(path, columns, None, na_values, missing)
    X, names, K = table.X, table.names, components
    if len(X) < K:
        raise ValueError(f"{path} has {len(X)} records: too few for {K} states")
    warmup = warmup or max(K, min(500, len(X) // 2))
    options = {"covariance_type": covariance_type, "batch_size": batch_size, "warmup": warmup, "seed": seed}
    online = OnlineGaussianHMM(K, features=tuple(names), **options)
    mixture = OnlineGMM(K, features=tuple(names), **options)
    frame = pd.DataFrame(X, columns=names)
    filtered, gmm_labels = [], np.full(passes * len(X), -1)
    for p in range(passes):
        filtered.append(online.filter_and_learn(X)[0])
        for start in range(0, len(X), batch_size):  # each mini-batch labelled before it is learned
            chunk = frame.iloc[start : start + batch_size]
            if mixture.is_warm:
                at = p * len(X) + start
                gmm_labels[at : at + len(chunk)] = np.asarray(mixture.predict_many(chunk))
            mixture.learn_many(chunk)
    filtered = np.concatenate(filtered)
    hmm_labels = filtered.argmax(axis=1)
    answered = np.flatnonzero(gmm_labels >= 0)
    first = max(warmup, int(answered[0]) if len(answered) else len(gmm_labels))
    if first >= len(hmm_labels) - 1:
        raise ValueError(f"{path} has {len(X)} records: too few to compare after a warm-up of {warmup}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        batch = GaussianHMM(K, covariance_type=covariance_type, n_init=3, random_state=seed).fit(X)
        replay = GaussianHMM(
            K, covariance_type=covariance_type, max_iter=0, startprob_init=online.startprob_,
            transmat_init=online.transmat_, means_init=online.means_, covariances_init=online.covariances_,
        ).fit(X)  # fmt: skip  # max_iter=0: the online parameters as they are, to score the file with
    distances = np.linalg.norm(online.means_[:, None, :] - batch.means_[None, :, :], axis=2)
    rows, matched = linear_sum_assignment(distances)
    matched = matched[np.argsort(rows)]
    order = np.argsort(matched)  # the online state behind each batch state
    covariances = [
        full_covariances(covariance_type, np.asarray(m.covariances_), K, X.shape[1]) for m in (online, batch)
    ]
    batch_path = np.tile(batch.predict(X), passes)
    batch_filter = np.tile(batch.filter_proba(X).argmax(axis=1), passes)
    compared = slice(first, None)
    report = HMMConsistencyReport(
        matching=tuple(int(j) for j in matched),
        transition_gap=float(np.abs(online.transmat_[np.ix_(order, order)] - batch.transmat_).max()),
        mean_gap=float(distances[np.arange(K), matched].max()),
        covariance_gap=float(max(np.linalg.norm(covariances[0][k] - covariances[1][j]) for k, j in enumerate(matched))),
        log_likelihood_gap=(replay.score(X) - batch.score(X)) / len(X),
        first_row=first,
        n_rows=len(hmm_labels) - first,
        switches={
            "online HMM filter": _per_thousand(hmm_labels[compared]),
            f"online HMM, p >= {REGIME_THRESHOLD}": _per_thousand(_announced(filtered[compared], REGIME_THRESHOLD)),
            "OnlineGMM labels": _per_thousand(gmm_labels[compared]),
            "batch HMM filter": _per_thousand(batch_filter[compared]),
            "batch HMM Viterbi": _per_thousand(batch_path[compared]),
        },
    )
    if out_dir is not None:
        shown = slice(first, max(first + 1, len(X)))
        figure = plots.regimes(
            X[shown], matched[hmm_labels[shown]], names=names, first=first,
            title="Online filter's regimes (batch state numbers)",
        )  # fmt: skip
        plots.save(figure, pathlib.Path(out_dir) / "regimes.png")
    return report
