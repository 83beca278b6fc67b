"""Figures of fitted mixtures (matplotlib, the `plots` extra; imported only when a figure is drawn).

Every function returns a `matplotlib.figure.Figure` (no pyplot, so no display is
needed); `save(fig, path)` writes it as PNG.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

__all__ = [
    "log_likelihood_trace",
    "mixture_1d",
    "mixture_2d",
    "online_trace",
    "regimes",
    "regression_lines",
    "responsibilities",
    "save",
    "selection",
]

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _figure(width: float = 7.0, height: float = 4.5, rows: int = 1, cols: int = 1, **kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("figures need matplotlib: pip install 'streamem[plots]'") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(rows, cols, **kwargs)


def _colour(k: int) -> str:
    return COLOURS[k % len(COLOURS)]


def save(figure, path) -> pathlib.Path:
    """Write the figure as a PNG; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


def _params(model):
    return model._params() if callable(getattr(model, "_params", None)) else model._params


def _variances_1d(params) -> np.ndarray:
    from streamem.families.gaussian import full_covariances

    return full_covariances(params)[:, 0, 0]


def mixture_1d(model, x, *, bins: int = 40, name: str = "x", title: str | None = None):
    """Histogram of 1-D data with each weighted component, the mixture density, and the
    records' assignments as a coloured rug below; `name` labels the axis (the feature)."""
    params = _params(model)
    x = np.asarray(x, dtype=float).ravel()
    figure, ax = _figure()
    ax.hist(x, bins=bins, density=True, color="0.85", edgecolor="0.6", label="data")
    grid = np.linspace(x.min() - 0.1 * np.ptp(x), x.max() + 0.1 * np.ptp(x), 400)
    variances = _variances_1d(params)
    total = np.zeros_like(grid)
    for k in range(len(params.weights)):
        density = (
            params.weights[k]
            * np.exp(-0.5 * (grid - params.means[k, 0]) ** 2 / variances[k])
            / math.sqrt(2 * math.pi * variances[k])
        )
        total += density
        ax.plot(grid, density, color=_colour(k), lw=1.5, label=f"component {k} (w={params.weights[k]:.2f})")
    ax.plot(grid, total, color="black", lw=2, label="mixture")
    labels = np.asarray(model.predict(x[:, None]))
    top = ax.get_ylim()[1]
    for k in np.unique(labels):
        chosen = x[labels == k]
        ax.plot(chosen, np.full(chosen.shape, -0.04 * top), "|", color=_colour(int(k)), ms=10)
    ax.set_ylim(-0.08 * top, top)
    ax.set_xlabel(name)
    ax.set_ylabel("density")
    ax.set_title(title or "Mixture fit; rug: assignments")
    ax.legend(fontsize=8)
    return figure


def log_likelihood_trace(model, *, n_records: int | None = None, title: str | None = None):
    """Mean log-likelihood per record at each EM iteration (a hidden Markov model's trace holds totals:
    give `n_records` to divide them)."""
    trace = np.asarray(model.log_likelihoods_) / (n_records or 1)
    figure, ax = _figure(6, 4)
    ax.plot(np.arange(1, len(trace) + 1), trace, "o-", ms=3)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("mean log-likelihood per record")
    ax.set_title(title or f"EM: {len(trace)} iterations ({'converged' if model.converged_ else 'not converged'})")
    return figure


def responsibilities(
    model, X, *, n: int = 30, seed: int = 0, name: str = "first feature", title: str | None = None
):
    """Stacked responsibilities of `n` records sampled from X, ordered by their first feature (`name`)."""
    X = np.asarray(X, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(X), size=min(n, len(X)), replace=False))
    sample = X[rows][np.argsort(X[rows, 0])]
    proba = np.asarray(model.predict_proba(sample))
    figure, ax = _figure(8, 4)
    left = np.zeros(len(sample))
    for k in range(proba.shape[1]):
        ax.barh(np.arange(len(sample)), proba[:, k], left=left, color=_colour(k), label=f"component {k}")
        left += proba[:, k]
    ax.set_yticks(np.arange(len(sample)), [f"{v:.2f}" for v in sample[:, 0]], fontsize=6)
    ax.set_xlabel("responsibility")
    ax.set_ylabel(f"record ({name})")
    ax.set_title(title or "Responsibilities of sampled records")
    ax.legend(fontsize=8, loc="lower right")
    return figure


def _ellipse(ax, mean, cov, scale: float, colour: str) -> None:
    from matplotlib.patches import Ellipse

    values, vectors = np.linalg.eigh(cov)
    angle = math.degrees(math.atan2(vectors[1, -1], vectors[0, -1]))
    width, height = 2 * scale * np.sqrt(np.maximum(values[::-1], 0))
    ax.add_patch(Ellipse(mean, width, height, angle=angle, fill=False, color=colour, lw=1.2, alpha=1.1 - 0.3 * scale))


def mixture_2d(
    model, X, *, dims: tuple[int, int] = (0, 1), names: tuple[str, str] | None = None, title: str | None = None
):
    """Records coloured by component, means, and covariance ellipses at 1, 2 and 3 standard deviations
    (in the two dimensions `dims`)."""
    from streamem.families.gaussian import full_covariances

    params = _params(model)
    X = np.asarray(X, dtype=float)
    labels = np.asarray(model.predict(X))
    i, j = dims
    covs = full_covariances(params)[:, [i, j]][:, :, [i, j]]
    figure, ax = _figure(6.5, 5.5)
    for k in range(len(params.weights)):
        chosen = X[labels == k]
        ax.scatter(chosen[:, i], chosen[:, j], s=8, color=_colour(k), alpha=0.6, label=f"component {k}")
        for scale in (1, 2, 3):
            _ellipse(ax, params.means[k, [i, j]], covs[k], scale, _colour(k))
        ax.plot(*params.means[k, [i, j]], "X", color="black", ms=9)
    ax.set_xlabel(names[0] if names else f"feature {i}")
    ax.set_ylabel(names[1] if names else f"feature {j}")
    ax.set_title(title or "Components: means (X) and 1, 2, 3 sd ellipses")
    ax.legend(fontsize=8)
    return figure


def regression_lines(model, x, y, *, names=None, target: str = "y", title: str | None = None):
    """Data coloured by responsibility, each component's line and its +-2 noise sd band (first feature);
    `names` (the features) and `target` label the axes."""
    params = _params(model)
    x = np.asarray(x, dtype=float)
    X = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=float)
    proba = np.asarray(model.predict_proba(X, y))
    figure, ax = _figure()
    colours = np.array([_colour(k) for k in proba.argmax(axis=1)])
    ax.scatter(X[:, 0], y, s=8, c=colours, alpha=np.clip(proba.max(axis=1), 0.2, 1.0))
    grid = np.linspace(X[:, 0].min(), X[:, 0].max(), 100)
    base = X.mean(axis=0)
    for k in range(len(params.weights)):
        line = params.intercept[k] + params.coef[k, 0] * grid + params.coef[k, 1:] @ base[1:]
        sd = math.sqrt(params.noise_variance[k])
        ax.plot(
            grid,
            line,
            color=_colour(k),
            lw=2,
            label=f"y = {params.coef[k, 0]:.3g} x + {params.intercept[k]:.3g}, sd {sd:.3g} (w={params.weights[k]:.2f})",
        )
        ax.fill_between(grid, line - 2 * sd, line + 2 * sd, color=_colour(k), alpha=0.15)
    ax.set_xlabel(names[0] if names else "x")
    ax.set_ylabel(target or "y")
    ax.set_title(title or "Mixture of regressions: lines and 2 sd noise bands")
    ax.legend(fontsize=8)
    return figure


def selection(components, bic, aic=None, *, title: str | None = None):
    """BIC (and AIC) against the number of components; the chosen K is marked."""
    components = np.asarray(components)
    figure, ax = _figure(6, 4)
    ax.plot(components, bic, "o-", label="BIC")
    if aic is not None:
        ax.plot(components, aic, "s--", label="AIC")
    best = components[int(np.argmin(bic))]
    ax.axvline(best, color="0.5", ls=":", label=f"lowest BIC: K={best}")
    ax.set_xlabel("number of components K")
    ax.set_ylabel("criterion (lower is better)")
    ax.set_title(title or "Model selection")
    ax.legend(fontsize=8)
    return figure


def online_trace(history, *, name: str = "first feature", title: str | None = None):
    """An online model's weights and means over time; `history` is a list of (n_seen, weights, means);
    the means shown are those of the first feature (`name`)."""
    seen = np.array([h[0] for h in history])
    weights = np.array([h[1] for h in history])
    means = np.array([np.asarray(h[2])[:, 0] for h in history])
    figure, (top, bottom) = _figure(8, 6, rows=2, sharex=True)
    for k in range(weights.shape[1]):
        top.plot(seen, weights[:, k], color=_colour(k), label=f"component {k}")
        bottom.plot(seen, means[:, k], color=_colour(k))
    top.set_ylabel("weight")
    top.legend(fontsize=8)
    bottom.set_ylabel(f"mean {name}" if name != "first feature" else "mean (first feature)")
    bottom.set_xlabel("records learned")
    top.set_title(title or "Online model over time")
    return figure


def regimes(series, states, *, names=None, first: int = 0, title: str | None = None, limit: int = 4):
    """Each column of `series` (n, m) against its row number (from `first`), one panel each (the first `limit`),
    with the background shaded by `states` (n,), the regime of each row; `names` label the panels."""
    series = np.asarray(series, dtype=float)
    if series.ndim == 1:
        series = series[:, None]
    states = np.asarray(states)
    shown = min(series.shape[1], limit)
    figure, axes = _figure(9, 1.2 + 1.4 * shown, rows=shown, sharex=True, squeeze=False)
    from matplotlib.colors import ListedColormap  # after _figure: it says what to install without matplotlib
    from matplotlib.patches import Patch

    steps = first + np.arange(len(series))
    K = int(states.max()) + 1 if len(states) else 1
    palette = ListedColormap([_colour(k) for k in range(K)])
    for j, ax in enumerate(axes[:, 0]):
        ax.plot(steps, series[:, j], color="black", lw=0.6)
        low, high = ax.get_ylim()
        # the regimes as one background strip, a cell per row (a span per run leaves slivers and draws slowly)
        ax.imshow(
            states[None, :], aspect="auto", cmap=palette, vmin=-0.5, vmax=K - 0.5, alpha=0.3, zorder=0,
            extent=(first - 0.5, first + len(states) - 0.5, low, high), interpolation="nearest",
        )  # fmt: skip
        ax.set_ylim(low, high)
        ax.set_ylabel(names[j] if names else f"feature {j}")
    shown_states = np.unique(states)
    handles = [Patch(color=_colour(int(k)), alpha=0.3, label=f"regime {k}") for k in shown_states]
    axes[0, 0].legend(handles=handles, fontsize=8, loc="upper right", ncols=min(len(shown_states), 4))
    axes[-1, 0].set_xlabel("record (file order)")
    axes[0, 0].set_title(title or "Series with regimes shaded")
    return figure
