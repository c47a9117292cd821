"""The LASER search (Sharma, Ash & Misra, ICLR 2024; docs/methods.md §9) over the interventions
of analysis/surgery/laser.py, after the paper's `scripts/laser_compose.py` and intervention scripts:

- grid over (τ, ℓ, ρ), selected on the first 20% of the evaluation blocks, reported on the
  last 80% (the paper's 20/80 protocol), metric next-token loss or top-1 accuracy;
- greedy composition: walk the layers from last to first; in each, raise the *removed*
  fraction 1 − ρ along the paper's schedule (0.45, 0.9, then +0.04 to 0.98) while the
  validation metric is no worse than the best so far (+ a tolerance, 0 by default), else
  revert to the last accepted ρ and move to the next layer;
- RMT rows: each (τ, ℓ) at the rank `mp_keep_rank` chooses (the MP edge), and all of them together.
"""

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from analysis.surgery.laser import (
    COMPOSE_SCHEDULE,
    TAU_MODULES,
    Intervention,
    Metric,
    SVDCache,
    SVDMethod,
    available_taus,
    intervened,
    rmt_interventions,
)
from analysis.surgery.scoring import block_metrics


@dataclass
class Split:
    """The paper's protocol: the first `val_fraction` of blocks select, the rest report."""

    n_blocks: int
    val_fraction: float = 0.2

    @property
    def n_val(self) -> int:
        return max(1, min(self.n_blocks - 1, round(self.val_fraction * self.n_blocks)))

    def summarise(self, loss: np.ndarray, acc: np.ndarray) -> dict[str, float]:
        v = self.n_val
        return {"val_loss": float(loss[:v].mean()), "val_acc": float(acc[:v].mean()),
                "test_loss": float(loss[v:].mean()), "test_acc": float(acc[v:].mean())}


def cost(row: dict[str, float], metric: Metric, split: str = "val") -> float:
    """Lower is better: the loss, or minus the accuracy."""
    return row[f"{split}_loss"] if metric == "loss" else -row[f"{split}_acc"]


@dataclass
class SearchConfig:
    """What the LASER search tries (docs/methods.md §9)."""

    taus: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "mlp_in", "mlp_out"])
    layers: list[int] | None = None  # None = every layer
    rhos: list[float] = field(default_factory=lambda: [0.9, 0.5, 0.25, 0.1, 0.05, 0.01])
    method: SVDMethod = "svd"
    metric: Metric = "loss"
    val_fraction: float = 0.2
    compose: bool = True  # greedy composition over layers, last to first
    compose_tau: str = "mlp_in"
    compose_schedule: list[float] = field(default_factory=lambda: list(COMPOSE_SCHEDULE))
    compose_tolerance: float = 0.0  # accept a step if val cost <= best + tolerance
    rmt: bool = True  # add one row per (τ, ℓ) with ρ from the MP edge, and all of them together
    rmt_tw_level: float | None = 0.01  # Tracy-Widom level added to the MP edge; None = the plain edge
    batch_size: int = 32

    def __post_init__(self) -> None:
        for tau in [*self.taus, self.compose_tau]:
            if tau not in TAU_MODULES:
                raise ValueError(f"search.taus: {tau!r} is unknown; allowed: {sorted(TAU_MODULES)}")
        for rho in self.rhos:
            if not 0.0 < rho <= 1.0:
                raise ValueError(f"search.rhos: {rho} is invalid; allowed: 0 < rho <= 1")
        if self.method not in ("svd", "lowrank"):
            raise ValueError(f"search.method={self.method!r} is invalid; allowed: ['svd', 'lowrank']")
        if self.metric not in ("loss", "acc"):
            raise ValueError(f"search.metric={self.metric!r} is invalid; allowed: ['loss', 'acc']")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"search.val_fraction={self.val_fraction} is invalid; allowed: 0 < f < 1")
        if any(not 0.0 < r < 1.0 for r in self.compose_schedule):
            raise ValueError(f"search.compose_schedule={self.compose_schedule}: removed fractions must be in (0, 1)")


Evaluate = Callable[[nn.Module], tuple[np.ndarray, np.ndarray]]


def _row(kind: str, interventions: Sequence[Intervention], scores: dict[str, float], **extra: object) -> dict:
    """A table row; several interventions show as tau "a+b", layer -1, rho NaN (details in `interventions`)."""
    if len(interventions) == 1:
        tau, layer, rho = interventions[0].tau, interventions[0].layer, interventions[0].rho
    elif not interventions:
        tau, layer, rho = "none", -1, 1.0
    else:
        tau, layer, rho = "+".join(sorted({i.tau for i in interventions})), -1, float("nan")
    return {
        "kind": kind,
        "tau": tau,
        "layer": layer,
        "rho": rho,
        "interventions": [asdict(i) for i in interventions],
        **scores,
        **extra,
    }


def grid_search(model: nn.Module, evaluate: Evaluate, cfg: SearchConfig, split: Split) -> list[dict]:
    """Base model plus every (τ, ℓ, ρ) of the grid, each scored on both splits."""
    layers = cfg.layers if cfg.layers is not None else list(range(len(model.blocks)))
    cache = SVDCache()
    rows = [_row("base", [], split.summarise(*evaluate(model)))]
    for tau in cfg.taus:
        for layer in layers:
            for rho in cfg.rhos:
                iv = Intervention(tau, layer, float(rho))
                with intervened(model, [iv], cfg.method, cache) as done:
                    scores = split.summarise(*evaluate(model))
                rows.append(_row("grid", [iv], scores, rank=int(done[0]["rank"])))
    return rows


def rmt_rows(model: nn.Module, evaluate: Evaluate, cfg: SearchConfig, split: Split) -> list[dict]:
    """One row per (τ, ℓ) at the MP-edge rank, and one with all of them applied together."""
    layers = cfg.layers if cfg.layers is not None else list(range(len(model.blocks)))
    fitted = rmt_interventions(model, cfg.taus, layers, cfg.rmt_tw_level)
    rows = []
    for iv, fit in fitted:
        with intervened(model, [iv], cfg.method):
            rows.append(_row("rmt", [iv], split.summarise(*evaluate(model)), rank=fit["rank"],
                             mp_sigma=fit["sigma"], mp_edge=fit["edge"], s_max=fit["s_max"]))
    ivs = [iv for iv, _ in fitted if iv.rho < 1.0]
    with intervened(model, ivs, cfg.method):
        rows.append(_row("rmt_all", ivs, split.summarise(*evaluate(model))))
    return rows


def greedy_compose(
    model: nn.Module, evaluate: Evaluate, cfg: SearchConfig, split: Split
) -> tuple[list[Intervention], list[dict]]:
    """The paper's composition: layers last to first, removed fraction raised while val cost <= best + tol.

    Each trial reduces the layer's *original* weights to ρ = 1 − removed (not a compounding of
    earlier trials); a rejected step reverts to the last accepted ρ of that layer. The model is
    left unchanged on return. -> (accepted interventions, one row per trial).
    """
    layers = cfg.layers if cfg.layers is not None else list(range(len(model.blocks)))
    best = cost(split.summarise(*evaluate(model)), cfg.metric)
    chosen: list[Intervention] = []
    trace = []
    cache = SVDCache()
    for layer in sorted(layers, reverse=True):
        accepted = None
        for removed in cfg.compose_schedule:
            iv = Intervention(cfg.compose_tau, layer, round(1.0 - removed, 6))
            with intervened(model, [*chosen, iv], cfg.method, cache):
                scores = split.summarise(*evaluate(model))
            ok = cost(scores, cfg.metric) <= best + cfg.compose_tolerance
            trace.append(_row("compose_trial", [iv], scores, accepted=ok))
            if not ok:
                break
            best, accepted = min(best, cost(scores, cfg.metric)), iv
        if accepted is not None:
            chosen.append(accepted)
    return chosen, trace


@dataclass
class LaserResult:
    """Everything the search measured; `best` is the candidate with the lowest validation cost."""

    rows: list[dict]
    best: dict
    base: dict
    composed: list[Intervention]
    metric: Metric = "loss"
    skipped_taus: list[str] = field(default_factory=list)  # asked for, but absent from this attention variant

    @property
    def best_interventions(self) -> list[Intervention]:
        return [Intervention(**d) for d in self.best["interventions"]]

    def verdict(self) -> dict[str, object]:
        """Did LASER help? The val-selected candidate against the base model on both splits (the
        honest answer is the held-out one), and how many single (τ, ℓ, ρ) beat the base on held-out
        data at all (an oracle count: those were not selected on the validation blocks)."""
        grid = [r for r in self.rows if r["kind"] == "grid"]
        base_val, base_test = cost(self.base, self.metric), cost(self.base, self.metric, "test")
        better = [r for r in grid if cost(r, self.metric, "test") < base_test]
        oracle = min(better, key=lambda r: cost(r, self.metric, "test")) if better else None
        return {
            "metric": self.metric,
            "best_improves_val": cost(self.best, self.metric) < base_val,
            "best_improves_heldout": cost(self.best, self.metric, "test") < base_test,
            "heldout_gain": base_test - cost(self.best, self.metric, "test"),  # > 0: the selected edit helped
            "grid_points": len(grid),
            "grid_points_better_heldout": len(better),
            "oracle_best_heldout": oracle["interventions"] if oracle else [],
            "oracle_heldout_gain": base_test - cost(oracle, self.metric, "test") if oracle else 0.0,
        }


def run_search(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SearchConfig) -> LaserResult:
    """Grid, RMT rows and greedy composition on blocks x, y (N, T); the model is left unchanged.

    Matrix types the model's attention variant lacks (k, v under MLA) are skipped and listed in
    `skipped_taus`; layers out of range fail before any work.
    """
    model.eval()
    taus = [t for t in cfg.taus if t in available_taus(model)]
    if not taus:
        raise ValueError(f"search.taus={cfg.taus}: none is in this model; available: {available_taus(model)}")
    skipped = [t for t in cfg.taus if t not in taus]
    bad = [layer for layer in cfg.layers or [] if not 0 <= layer < len(model.blocks)]
    if bad:
        raise ValueError(f"search.layers: {bad} out of range; the model has {len(model.blocks)} layers")
    cfg = replace(cfg, taus=taus)
    split = Split(len(x), cfg.val_fraction)

    def evaluate(m: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return block_metrics(m, x, y, cfg.batch_size)

    rows = grid_search(model, evaluate, cfg, split)
    if cfg.rmt:
        rows += rmt_rows(model, evaluate, cfg, split)
    composed: list[Intervention] = []
    if cfg.compose:
        composed, trace = greedy_compose(model, evaluate, cfg, split)
        rows += trace
        with intervened(model, composed, cfg.method):
            rows.append(_row("compose", composed, split.summarise(*evaluate(model))))
    candidates = [r for r in rows if r["kind"] in ("grid", "rmt", "rmt_all", "compose") and r["interventions"]]
    best = min(candidates, key=lambda r: cost(r, cfg.metric)) if candidates else rows[0]
    return LaserResult(rows=rows, best=best, base=rows[0], composed=composed, metric=cfg.metric, skipped_taus=skipped)


# ----------------------------------------------------------------------------------- plot


def plot_grid(rows: Sequence[dict], title: str = "LASER"):
    """Held-out loss vs ρ (log axis), one panel per τ, one line per layer; base model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["kind"] == "grid"]
    base = next(r for r in rows if r["kind"] == "base")
    taus = list(dict.fromkeys(r["tau"] for r in grid))
    cols = min(3, max(1, len(taus)))
    nrows = -(-max(1, len(taus)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.0 * cols, 3.0 * nrows), squeeze=False)
    for ax, tau in zip(axes.flat, taus, strict=False):
        for layer in sorted({r["layer"] for r in grid if r["tau"] == tau}):
            pts = sorted((r["rho"], r["test_loss"]) for r in grid if r["tau"] == tau and r["layer"] == layer)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=f"layer {layer}")
        ax.axhline(base["test_loss"], color="black", ls="--", lw=1, label="base")
        ax.set_xscale("log")
        ax.set_xlabel("ρ (fraction of rank kept)")
        ax.set_ylabel("held-out loss")
        ax.set_title(f"τ = {tau}", fontsize=10)
    for ax in list(axes.flat)[len(taus):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
