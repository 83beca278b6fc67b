"""The offline workflow behind `streamem fit` and `streamem check`: fit a table, report, compare.

A fit writes `model.json` (parameters plus the normalised sufficient statistics,
so `OnlineGMM.from_fit` / `OnlineRegressionMixture.from_fit` can continue from it
online), PNG figures and `report.md` into one directory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import re
import shlex
import sys
import warnings

import numpy as np
import pandas as pd

from streamem import plots
from streamem.exceptions import ConvergenceWarning
from streamem.gaussian_mixture import GaussianMixture
from streamem.regression_mixture import RegressionMixture

__all__ = [
    "FIT_FORMAT",
    "MissingExtra",
    "Table",
    "check_table",
    "fit_document",
    "fit_table",
    "load_table",
    "parse_components",
    "read_table",
]

FIT_FORMAT = "streamem.fit"


# The largest magnitude a value may have: EM sums squares (and cross products) of the values over
# the file, which must stay far below the float limit (1.8e308) to mean anything.
LARGEST = 1e100

# Cell texts read as a missing value (as pandas reads them), before any `na_values` of the caller.
NA_TEXTS = frozenset({"", "NA", "N/A", "n/a", "NaN", "nan", "NULL", "null", "None", "#N/A", "<NA>"})

# What a missing value's error suggests (a mixture can integrate it out; `--model hmm` says otherwise).
MARGINALIZE_ADVICE = (
    "use --missing marginalize to integrate missing values out (or leave the column out with --columns)"
)


@dataclasses.dataclass(frozen=True)
class Table:
    """A CSV file's feature columns as numbers (NaN where a value is missing)."""

    X: np.ndarray  # (n, d)
    names: list[str]  # the d feature columns
    y: np.ndarray | None  # the target column, if one was asked for
    missing: dict[str, int]  # missing cells per feature column
    skipped: list[str]  # text columns left out (no --columns given)


def read_table(
    path,
    columns: list[str] | None = None,
    target: str | None = None,
    *,
    na_values=(),
    missing: str = "error",
    missing_advice: str = MARGINALIZE_ADVICE,
) -> Table:
    """Read a CSV file with a header row into numbers, refusing what would silently change the data.

    A cell that is not a number, in a column used as a feature or target, is an error naming the
    file line (as an editor shows it: the header is line 1) and the column, unless its text is one
    of `na_values` (or empty, NA, NaN, ...): then it is a missing value, itself an error unless
    `missing="marginalize"` (the error ends with `missing_advice`). Without `columns`, the features are every
    column (but the target) that holds numbers; a column of text is left out, and one stray text cell in a
    column of numbers is an error, not a reason to drop the column.
    """
    path = pathlib.Path(path)
    header, rows, lines = _read_csv(path)
    if len(set(header)) != len(header):
        twice = next(name for name in header if header.count(name) > 1)
        raise ValueError(f"{path}: column {twice!r} appears twice in the header")
    if target is not None and target not in header:
        raise ValueError(f"target column {target!r} is not in {path}; columns: {header}")
    if columns:
        unknown = [c for c in columns if c not in header]
        if unknown:
            raise ValueError(f"column {unknown[0]!r} is not in {path}; columns: {header}")
    na = NA_TEXTS | {str(value) for value in na_values}
    parsed = {}
    for j, name in enumerate(header):
        if name == target or not columns or name in columns:
            parsed[name] = _numbers([row[j] for row in rows], na)
    if columns:
        names = list(columns)
        skipped = []
    else:
        # a column of text (fewer numbers than texts) is not a feature; one stray cell does not make text
        names = [n for n in header if n != target and parsed[n][2] > 0 and parsed[n][2] >= len(parsed[n][1])]
        skipped = [n for n in header if n != target and n not in names]
    wanted = list(columns) if columns else [n for n in header if n != target]
    empty = [n for n in wanted if rows and parsed[n][2] == 0 and not parsed[n][1]]  # every cell missing
    if empty:
        # nothing to learn from, not even with --missing marginalize (no mean to integrate around)
        keep = [n for n in names if n not in empty]
        way_out = f"; leave it out with --columns {','.join(keep)}" if keep else ""
        raise ValueError(f"{path}: column {empty[0]!r} has no values ({len(rows)} missing cells){way_out}")
    if not names:
        raise ValueError(f"{path} has no numeric feature columns")
    for name in [*names, *([target] if target else [])]:
        values, bad, _ = parsed[name]
        if bad:
            row, text = bad[0]
            more = f" ({len(bad)} such cells in this column)" if len(bad) > 1 else ""
            raise ValueError(
                f"{path} line {lines[row]}, column {name!r}: {text!r} is not a number{more}; "
                f"to read it as a missing value: --na-values {shlex.quote(text)}"
            )
    for name in [*names, *([target] if target else [])]:
        huge = np.flatnonzero(np.abs(parsed[name][0]) > LARGEST)
        if len(huge):
            raise ValueError(
                f"{path} line {lines[huge[0]]}, column {name!r}: {rows[huge[0]][header.index(name)].strip()} is too "
                f"large: EM sums squares of the values, which overflow beyond +-{LARGEST:.0e}; rescale the column"
            )
    if target is not None:
        absent = np.flatnonzero(np.isnan(parsed[target][0]))
        if len(absent):
            raise ValueError(
                f"{path} line {lines[absent[0]]}, column {target!r}: missing target value "
                f"({len(absent)} in all); rows without a target cannot be fitted"
            )
    X = np.column_stack([parsed[name][0] for name in names]) if rows else np.empty((0, len(names)))
    counts = {name: int(np.isnan(parsed[name][0]).sum()) for name in names}
    if missing == "error" and any(counts.values()):
        row, col = np.argwhere(np.isnan(X))[0]
        raise ValueError(
            f"{path} line {lines[row]}, column {names[col]!r}: missing value ({sum(counts.values())} in all); "
            + missing_advice
        )
    y = None if target is None else parsed[target][0]
    return Table(X, names, y, {name: count for name, count in counts.items() if count}, skipped)


def _read_csv(path: pathlib.Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows of cell texts, and each row's line number in the file (blank lines skipped)."""
    try:
        return _read_csv_rows(path)
    except UnicodeDecodeError:  # (a ValueError whose message names neither the file nor the line)
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise ValueError(
                f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}); save the file as UTF-8"
            ) from None
        raise


def _read_csv_rows(path: pathlib.Path) -> tuple[list[str], list[list[str]], list[int]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path} is empty: a header row is needed")
        header = [name.strip() for name in header]
        rows, lines = [], []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path} line {reader.line_num}: {len(row)} cells, but the header has {len(header)} columns"
                )
            rows.append(row)
            lines.append(reader.line_num)
    return header, rows, lines


def _numbers(cells: list[str], na: frozenset) -> tuple[np.ndarray, list[tuple[int, str]], int]:
    """(values with NaN where missing, [(row, text)] of cells that are no finite number, count of numbers)."""
    texts = pd.Series(cells, dtype=object).str.strip()
    absent = texts.isin(na).to_numpy()
    values = np.array(pd.to_numeric(texts.where(~absent), errors="coerce"), dtype=float)  # a writable copy
    bad = ~absent & ~np.isfinite(values)
    values[bad] = np.nan
    rows = np.flatnonzero(bad)
    return values, [(int(i), str(texts.iloc[i])) for i in rows], int((~absent & ~bad).sum())


def load_table(path, columns: list[str] | None = None, target: str | None = None, **options):
    """(X (n, d), feature names, y or None) from a CSV file; see `read_table` for the checks and `options`."""
    table = read_table(path, columns, target, **options)
    return table.X, table.names, table.y


def parse_components(value) -> list[int]:
    """The numbers of components to try: "auto" (1-8), K, or a range "A-B" with 1 <= A <= B."""
    if value == "auto":
        return list(range(1, 9))
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)-(\d+)|(-?\d+)", text)
    if match is None:
        raise ValueError(f"{text!r} is not a number of components: give K, a range A-B like 1-6, or auto")
    low, high = (int(match[1]), int(match[2])) if match[3] is None else (int(match[3]), int(match[3]))
    if low < 1:
        raise ValueError(f"the number of components must be at least 1, got {text!r}")
    if low > high:
        raise ValueError(f"the range {text} is empty: A-B needs A <= B")
    return list(range(low, high + 1))


class MissingExtra(ImportError):
    """An optional dependency a command needs is not installed; the message names the extra."""


def require_plots() -> None:
    """Fail before any work or file when the figures cannot be drawn (matplotlib is the `plots` extra)."""
    try:
        import matplotlib.figure  # noqa: F401 - only whether it imports
    except ImportError:
        raise MissingExtra("figures need matplotlib: pip install 'streamem[plots]'", name="matplotlib") from None


def fit_table(
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
    """Fit the batch core to a CSV file and write model.json, figures and report.md into `out_dir`.

    Everything is checked (matplotlib, components, the table) before `out_dir` is created. `progress` gets a
    line per K tried (rewritten in place with a carriage return when it is a terminal). A hidden Markov
    model is `streamem.hmm_report.fit_hmm_table`, with the same arguments.
    """
    require_plots()
    candidates = parse_components(components)
    if pathlib.Path(out_dir).exists() and not pathlib.Path(out_dir).is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a directory")
    if target is not None and missing != "error":
        raise ValueError("missing values are supported for Gaussian mixtures only, not with a target")
    table = read_table(path, columns, target, na_values=na_values, missing=missing)
    X, names, y = table.X, table.names, table.y
    if len(X) < max(candidates):
        raise ValueError(f"{path} has {len(X)} records: too few for {max(candidates)} components")
    fits, bics, aics = [], [], []
    for i, K in enumerate(candidates, start=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if y is None:
                model = GaussianMixture(
                    K, covariance_type=covariance_type, n_init=n_init, random_state=seed, missing=missing
                ).fit(X)
                bic, aic = model.bic(X), model.aic(X)
            else:
                model = RegressionMixture(K, n_init=n_init, random_state=seed).fit(X, y)
                bic, aic = model.bic(X, y), model.aic(X, y)
        fits.append(model)
        bics.append(bic)
        aics.append(aic)
        print_progress(progress, i, candidates, K, bic, model.n_iter_)
    best = int(np.argmin(bics))
    model = fits[best]
    document = fit_document(model, names, X, y, target=target)
    out = pathlib.Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(document, indent=1))
    figures = _figures(model, X, y, names, candidates, bics, aics, out / "figures", target=target)
    _write_report(out, path, document, figures, candidates, bics, aics, table)
    return document


def print_progress(progress, i: int, candidates: list[int], K: int, bic: float, n_iter: int) -> None:
    """The progress line of the i-th K tried (1-based), rewritten in place when `progress` is a terminal."""
    tty = progress.isatty() if hasattr(progress, "isatty") else False
    bar = "#" * i + "." * (len(candidates) - i)
    print(  # in a log (not a terminal), one line per K: a carriage return would pile them on one line
        f"{chr(13) if tty else ''}[{bar}] K={K}: BIC {bic:,.1f} ({n_iter} iterations)",
        end="\n" if i == len(candidates) or not tty else "",
        file=progress,
        flush=True,
    )


def fit_document(model, names, X, y=None, *, target: str | None = None) -> dict:
    """A fitted batch model as the JSON document `streamem fit` writes (model.json)."""
    bic, aic = (model.bic(X), model.aic(X)) if y is None else (model.bic(X, y), model.aic(X, y))
    params = model._params
    stats = model._stats.scaled(1.0 / len(X))
    document = {
        "format": FIT_FORMAT,
        "version": 1,
        "family": "regression" if y is not None else "gaussian",
        "features": names,
        "target": target,
        "n_components": int(len(params.weights)),
        "n_samples": int(len(X)),
        "log_likelihood": float(model.lower_bound_),
        "bic": float(bic),
        "aic": float(aic),
        "converged": bool(model.converged_),
        "params": {name: np.asarray(getattr(params, name)).tolist() for name in type(model)._family_fields},
        "statistics": stats.to_dict(),
    }
    if y is None:
        document["covariance_type"] = params.covariance_type
        document["missing"] = model.missing
    return document


def _figures(
    model, X, y, names, candidates, bics, aics, folder: pathlib.Path, target: str | None = None
) -> list[pathlib.Path]:
    paths = [plots.save(plots.log_likelihood_trace(model), folder / "log_likelihood.png")]
    if len(candidates) > 1:
        paths.append(plots.save(plots.selection(candidates, bics, aics), folder / "selection.png"))
    if y is not None:
        figure = plots.regression_lines(model, X, y, names=names, target=target)
        paths.append(plots.save(figure, folder / "regression.png"))
        return paths
    complete = X[~np.isnan(X).any(axis=1)] if np.isnan(X).any() else X
    if X.shape[1] == 1:
        paths.append(plots.save(plots.mixture_1d(model, complete[:, 0], name=names[0]), folder / "mixture.png"))
    else:
        paths.append(plots.save(plots.mixture_2d(model, complete, names=(names[0], names[1])), folder / "mixture.png"))
    figure = plots.responsibilities(model, complete, name=names[0])
    paths.append(plots.save(figure, folder / "responsibilities.png"))
    return paths


def number_text(value) -> str:
    """A number for a table: 4 significant digits."""
    return f"{float(value):.4g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _parameter_tables(document: dict) -> list[str]:
    """The fitted parameters as markdown tables (model.json keeps them at full precision)."""
    params, names = document["params"], document["features"]
    K = document["n_components"]
    weights = params["weights"]
    if document["family"] == "regression":
        header = ["component", "weight", *(f"coef {n}" for n in names), "intercept", "noise sd"]
        rows = [
            [str(k), number_text(weights[k]), *map(number_text, params["coef"][k]), number_text(params["intercept"][k]),
             number_text(np.sqrt(params["noise_variance"][k]))]
            for k in range(K)
        ]  # fmt: skip
        return markdown_table(header, rows)
    means = np.asarray(params["means"])
    covariances = full_covariances(document["covariance_type"], np.asarray(params["covariances"]), K, len(names))
    sds = np.sqrt(np.einsum("kii->ki", covariances))
    lines = markdown_table(
        ["component", "weight", *(f"mean {n}" for n in names)],
        [[str(k), number_text(weights[k]), *map(number_text, means[k])] for k in range(K)],
    )
    lines += ["", f"Standard deviations ({document['covariance_type']} covariance):", ""]
    lines += markdown_table(
        ["component", *(f"sd {n}" for n in names)], [[str(k), *map(number_text, sds[k])] for k in range(K)]
    )
    if document["covariance_type"] in ("full", "tied") and len(names) > 1:
        shown = range(1) if document["covariance_type"] == "tied" else range(K)
        for k in shown:
            correlation = covariances[k] / np.outer(sds[k], sds[k])
            title = "all components" if document["covariance_type"] == "tied" else f"component {k}"
            lines += ["", f"Correlations, {title}:", ""]
            lines += markdown_table(["", *names], [[n, *map(number_text, correlation[i])] for i, n in enumerate(names)])
    return lines


def full_covariances(kind: str, covariances: np.ndarray, K: int, d: int) -> np.ndarray:
    if kind == "full":
        return covariances
    if kind == "tied":
        return np.broadcast_to(covariances, (K, d, d))
    if kind == "diag":
        return np.stack([np.diag(row) for row in covariances])
    return np.stack([np.eye(d) * value for value in covariances])  # spherical


def missing_line(table: Table) -> str:
    total = sum(table.missing.values())
    if not total:
        return "There are no missing values."
    cells = table.X.size
    per_column = ", ".join(f"{name} {count}" for name, count in table.missing.items())
    return (
        f"{total} missing value{'s' if total != 1 else ''} ({100 * total / cells:.1f}% of cells: {per_column}), "
        "integrated out (missing marginalize)."
    )


def _write_report(out: pathlib.Path, source, document, figures, candidates, bics, aics, table: Table) -> None:
    best = document["n_components"]
    what = f"{document['n_samples']} records, features {', '.join(document['features'])}"
    if document["target"]:
        what += f", target {document['target']}"
    if len(candidates) > 1:
        what += f"; {best} components chosen by BIC from K={candidates[0]}-{candidates[-1]}."
    else:
        what += f"; {best} components."
    lines = [
        f"# Mixture fit of `{pathlib.Path(source).name}`",
        "",
        what,
        f"Log-likelihood per record {document['log_likelihood']:.4f}, BIC {document['bic']:.1f}, "
        f"AIC {document['aic']:.1f}, {'converged' if document['converged'] else 'NOT converged'}.",
        missing_line(table),
    ]
    if table.skipped:
        lines.append(f"Text columns left out: {', '.join(table.skipped)}.")
    if len(candidates) > 1 and best == candidates[-1]:
        lines += [
            "",
            f"**Warning:** BIC chose K={best}, the largest K searched: a larger K may fit better. "
            f"Search further, e.g. `--n-components {candidates[0]}-{2 * best}`.",
        ]
    criteria = [[str(k), f"{b:.1f}", f"{a:.1f}"] for k, b, a in zip(candidates, bics, aics, strict=True)]
    lines += ["", *markdown_table(["K", "BIC", "AIC"], criteria)]
    lines += ["", "## Parameters", "", *_parameter_tables(document), ""]
    lines += [*(f"![{p.stem}](figures/{p.name})" for p in figures), ""]
    (out / "report.md").write_text("\n".join(lines))


def check_table(
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
):
    """Run the online model over the file's rows as a stream (in file order, `passes` times) and the
    batch core over the whole; return the consistency report (and write the online figure). The hidden
    Markov models' is `streamem.hmm_report.check_hmm_table`, with the same arguments."""
    from streamem.compare import compare
    from streamem.online_gmm import OnlineGMM

    if out_dir is not None:
        require_plots()
    X, names, _ = load_table(path, columns, na_values=na_values, missing=missing)
    warmup = warmup or max(components, min(500, len(X) // 2))
    online = OnlineGMM(
        components,
        covariance_type=covariance_type,
        batch_size=batch_size,
        warmup=warmup,
        features=tuple(names),
        seed=seed,
        missing=missing,
    )
    history = []
    frame = pd.DataFrame(X, columns=names)
    step = max(batch_size, len(X) // 50)
    for _ in range(passes):
        for start in range(0, len(X), step):
            online.learn_many(frame.iloc[start : start + step])
            if online.is_warm:
                history.append((online.n_seen, online.weights_.tolist(), online.means_.tolist()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        batch = GaussianMixture(
            components, covariance_type=covariance_type, n_init=3, random_state=seed, missing=missing
        ).fit(X)
    report = compare(online, batch, X[~np.isnan(X).any(axis=1)])
    if out_dir is not None and history:
        plots.save(plots.online_trace(history, name=names[0]), pathlib.Path(out_dir) / "online.png")
    return report
