"""Figures of spectral health: arrays in, matplotlib figures out (no Lightning, no W&B)."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure


def null_grid(eigs: np.ndarray, edge: np.ndarray, points: int = 256) -> np.ndarray:
    """Log-spaced λ from 1e-3 to 1.1 x the largest eigenvalue or edge: where a null density is drawn."""
    top = max(float(np.nanmax(eigs)) if np.isfinite(eigs).any() else 1.0,
              float(np.nanmax(edge)) if np.isfinite(edge).any() else 1.0)
    return np.geomspace(1e-3, max(top, 2e-3) * 1.1, points)


def esd_grid(eigs: np.ndarray, edge: np.ndarray, null_grid: np.ndarray | None = None,
             null_density: np.ndarray | None = None, title: str = "", log_x: bool = False,
             threshold: np.ndarray | None = None) -> Figure:
    """One panel per layer: histogram of all heads' normalised eigenvalues λ (eigs: (L, H, r)),
    the null density on `null_grid`, the median bulk edge of the layer's heads and, given (L, H)
    `threshold`, the median spike threshold. With `log_x` the bins are log-spaced and both axes
    logarithmic, so a bulk near 1 and outliers near 10^3 are both visible."""
    L = eigs.shape[0]
    cols = min(L, 4)
    rows = -(-L // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for layer, ax in enumerate(axes.flat):
        if layer >= L:
            ax.axis("off")
            continue
        values = eigs[layer].ravel()
        values = values[np.isfinite(values)]
        if log_x:
            values = values[values > 0]
        if values.size:
            bins = np.geomspace(max(values.min(), 1e-6), values.max() * 1.01, 50) if log_x and values.max() > 0 else 40
            ax.hist(values, bins=bins, density=True, color="tab:blue", alpha=0.6, label="ESD")
        if null_grid is not None and null_density is not None:
            shown = null_density > 0 if log_x else slice(None)
            ax.plot(null_grid[shown], null_density[shown], color="black", lw=1, label="null density")
        ax.axvline(float(np.nanmedian(edge[layer])), color="tab:red", ls="--", lw=1, label="bulk edge")
        if threshold is not None:
            ax.axvline(float(np.nanmedian(threshold[layer])), color="tab:orange", ls=":", lw=1.2,
                       label="spike threshold")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
            ax.set_xlabel("λ (normalised)", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def layer_head_heatmap(values: np.ndarray, title: str, label: str = "λ_max / edge", log_color: bool = False,
                       annotate: bool = False) -> Figure:
    """A (L, H) grid, e.g. λ_max over the bulk edge per head; values > 1 are beyond the edge. With
    `log_color` the colour scale is logarithmic (one extreme head does not wash out the rest); with
    `annotate` each cell shows its value."""
    fig, ax = plt.subplots(figsize=(1.4 + 0.6 * values.shape[1], 1.0 + 0.45 * values.shape[0]))
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if log_color and positive.size else None
    im = ax.imshow(values, cmap="magma", aspect="auto", norm=norm)
    if annotate:
        mid = np.sqrt(positive.min() * positive.max()) if log_color and positive.size else np.nanmean(values)
        for (layer, head), v in np.ndenumerate(values):
            ax.text(head, layer, f"{v:.3g}", ha="center", va="center", fontsize=7,
                    color="black" if np.isfinite(v) and v > mid else "white")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label + (" (log scale)" if norm is not None else ""))
    fig.tight_layout()
    return fig


def step_layer_heatmap(steps: Sequence[int], values: np.ndarray, title: str, label: str) -> Figure:
    """A (S, L) history, e.g. max over heads of λ_max/edge per layer at each checked step."""
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * values.shape[1]))
    im = ax.imshow(values.T, cmap="magma", aspect="auto", interpolation="nearest",
                   extent=(steps[0], steps[-1], values.shape[1] - 0.5, -0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig


def lines_over_steps(steps: Sequence[int], values: np.ndarray, title: str, ylabel: str,
                     log_y: bool = False) -> Figure:
    """One line per layer of a (S, L) history."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for layer in range(values.shape[1]):
        ax.plot(steps, values[:, layer], label=f"L{layer}")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(6, values.shape[1]))
    fig.tight_layout()
    return fig


def loss_with_alerts(curves: dict[str, tuple[np.ndarray, np.ndarray]], alerts: Sequence[dict]) -> Figure:
    """Loss curves (name -> (steps, values)) with each alert as a marker on the first curve at its step:
    x for WARN/ERROR, a small dot for INFO, labelled with the rule."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None, ms=3)
    steps, values = next(iter(curves.values()))
    for level, marker, colour in (("INFO", ".", "tab:gray"), ("WARN", "x", "tab:red"), ("ERROR", "X", "black")):
        hits = [a for a in alerts if a["level"] == level]
        if hits and len(steps):
            xs = [a["step"] for a in hits]
            ax.plot(xs, np.interp(xs, steps, values), marker, color=colour, ms=8, ls="none",
                    label=f"{level}: " + ", ".join(sorted({a['rule'] for a in hits})))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss, with alerts", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def alert_bench_figure(records: dict, labels: dict) -> Figure:
    """The alerts benchmark: max logit (top) and train loss (bottom) over steps, one line per run,
    coloured by label; x marks each run's first WARN, o its failure step (analysis/study/alert_bench.py)."""
    colours = {"healthy": "tab:green", "damaged": "tab:orange", "diverged": "tab:red"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name, r in records.items():
        lab = labels[name]
        c = colours[lab.label]
        top.plot(r.logit_steps, r.max_logit, color=c, lw=0.8, alpha=0.7)
        bottom.plot(r.steps, r.train_loss, color=c, lw=0.8, alpha=0.7)
        warns = [a["step"] for a in r.alerts if a["level"] in ("WARN", "ERROR")]
        if warns:
            w = min(warns)
            top.plot([w], [np.interp(w, r.logit_steps, r.max_logit)], "x", color="black", ms=6)
            bottom.plot([w], [np.interp(w, r.steps, r.train_loss)], "x", color="black", ms=6)
        if lab.fail_step is not None:
            bottom.plot([lab.fail_step], [np.interp(lab.fail_step, r.steps, r.train_loss)], "o", mfc="none",
                        color=c, ms=7)
    top.set_yscale("log")
    top.set_ylabel("max attention logit (probe batch)")
    bottom.set_ylabel("train loss")
    bottom.set_xlabel("step")
    for lab, c in colours.items():
        top.plot([], [], color=c, label=lab)
    top.plot([], [], "x", color="black", label="first WARN")
    bottom.plot([], [], "o", mfc="none", color="gray", label="labelled failing from")
    top.legend(loc="lower right", fontsize=8)
    bottom.legend(loc="upper right", fontsize=8)
    top.set_title("Alerts benchmark: attention logits and loss of every run")
    fig.tight_layout()
    return fig
