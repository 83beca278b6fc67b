"""The offline workflow behind `streamem fit` and `streamem check`: fit a table, report, compare.

A fit writes `model.json` (parameters plus the normalised sufficient statistics,
so `OnlineGMM.from_fit` / `OnlineRegressionMixture.from_fit` can continue from it
online), PNG figures and `report.md` into one directory.
"""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

import numpy as np
import pandas as pd

from streamem import plots
from streamem.exceptions import ConvergenceWarning
from streamem.gaussian_mixture import GaussianMixture
from streamem.regression_mixture import RegressionMixture

__all__ = ["FIT_FORMAT", "check_table", "fit_document", "fit_table", "load_table"]

FIT_FORMAT = "streamem.fit"


def load_table(path, columns: list[str] | None = None, target: str | None = None):
    """(X (n, d), feature names, y or None) from a CSV file's numeric columns."""
    frame = pd.read_csv(path)
    if target is not None and target not in frame.columns:
        raise ValueError(f"target column {target!r} is not in {path}; columns: {list(frame.columns)}")
    if columns:
        unknown = [c for c in columns if c not in frame.columns]
        if unknown:
            raise ValueError(f"column {unknown[0]!r} is not in {path}; columns: {list(frame.columns)}")
        names = list(columns)
    else:
        names = [c for c in frame.columns if c != target and pd.api.types.is_numeric_dtype(frame[c])]
    if not names:
        raise ValueError(f"{path} has no numeric feature columns")
    non_numeric = [c for c in names if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ValueError(f"column {non_numeric[0]!r} is not numeric")
    y = None if target is None else frame[target].to_numpy(float)
    return frame[names].to_numpy(float), names, y


def _candidates(components) -> list[int]:
    if components == "auto":
        return list(range(1, 9))
    if isinstance(components, str) and "-" in components:
        low, high = (int(v) for v in components.split("-"))
        return list(range(low, high + 1))
    return [int(components)]


def fit_table(
    path,
    out_dir,
    *,
    components="auto",
    covariance_type: str = "full",
    target: str | None = None,
    columns: list[str] | None = None,
    missing: str = "error",
    n_init: int = 3,
    seed: int = 0,
    progress=sys.stderr,
) -> dict:
    """Fit the batch core to a CSV file and write model.json, figures and report.md into `out_dir`."""
    X, names, y = load_table(path, columns, target)
    if y is not None and missing != "error":
        raise ValueError("missing values are supported for Gaussian mixtures only, not with a target")
    out = pathlib.Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    candidates = _candidates(components)
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
        bar = "#" * i + "." * (len(candidates) - i)
        print(
            f"\r[{bar}] K={K}: BIC {bic:,.1f} ({model.n_iter_} iterations)",
            end="\n" if i == len(candidates) else "",
            file=progress,
            flush=True,
        )
    best = int(np.argmin(bics))
    model = fits[best]
    document = fit_document(model, names, X, y, target=target)
    (out / "model.json").write_text(json.dumps(document, indent=1))
    figures = _figures(model, X, y, names, candidates, bics, aics, out / "figures")
    _write_report(out, path, document, figures, candidates, bics)
    return document


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
        "statistics": {name: value.tolist() for name, value in stats.to_arrays().items()},
    }
    if y is None:
        document["covariance_type"] = params.covariance_type
        document["missing"] = model.missing
    return document


def _figures(model, X, y, names, candidates, bics, aics, folder: pathlib.Path) -> list[pathlib.Path]:
    paths = [plots.save(plots.log_likelihood_trace(model), folder / "log_likelihood.png")]
    if len(candidates) > 1:
        paths.append(plots.save(plots.selection(candidates, bics, aics), folder / "selection.png"))
    if y is not None:
        paths.append(plots.save(plots.regression_lines(model, X, y), folder / "regression.png"))
        return paths
    complete = X[~np.isnan(X).any(axis=1)] if np.isnan(X).any() else X
    if X.shape[1] == 1:
        paths.append(plots.save(plots.mixture_1d(model, complete[:, 0]), folder / "mixture.png"))
    else:
        paths.append(plots.save(plots.mixture_2d(model, complete, names=(names[0], names[1])), folder / "mixture.png"))
    paths.append(plots.save(plots.responsibilities(model, complete), folder / "responsibilities.png"))
    return paths


def _write_report(out: pathlib.Path, source, document, figures, candidates, bics) -> None:
    lines = [
        f"# Mixture fit of `{pathlib.Path(source).name}`",
        "",
        f"{document['n_samples']} records, features {', '.join(document['features'])}"
        + (f", target {document['target']}" if document["target"] else "")
        + f"; {document['n_components']} components chosen by BIC from {candidates}.",
        f"Log-likelihood per record {document['log_likelihood']:.4f}, BIC {document['bic']:.1f}, "
        f"AIC {document['aic']:.1f}, {'converged' if document['converged'] else 'NOT converged'}.",
        "",
        "| K | BIC |",
        "|---|---|",
        *(f"| {k} | {b:.1f} |" for k, b in zip(candidates, bics, strict=True)),
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(document["params"], indent=1),
        "```",
        "",
        *(f"![{p.stem}](figures/{p.name})" for p in figures),
        "",
    ]
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
):
    """Run the online model over the file's rows as a stream (in file order, `passes` times) and the
    batch core over the whole; return the consistency report (and write the online figure)."""
    from streamem.compare import compare
    from streamem.online_gmm import OnlineGMM

    X, names, _ = load_table(path, columns)
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
        plots.save(plots.online_trace(history), pathlib.Path(out_dir) / "online.png")
    return report
