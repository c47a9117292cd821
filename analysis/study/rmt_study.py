"""Seed 000 at small scale: per-run spectral numbers of a sweep, aggregated over seeds per variant.

Pure pieces (numpy, matplotlib; no Lightning, Hydra or W&B). A run is given as its spectral
history (analysis/spectral/history.py), the alerts it raised (alerts.jsonl records) and its validation
loss series; scripts/rmt_figures.py reads those from a sweep directory.

Definitions used in the numbers (per layer, one spectral kind, e.g. "content"):
- crossing: some head of the layer has num_spikes > 0, i.e. an eigenvalue beyond the null's
  Bonferroni-level threshold (stricter than λ_max/edge > 1, which the heatmaps show);
- first crossing step: the first checked step at which the layer crossed (None: never);
- spike count: the layer's spikes summed over heads; its peak is the maximum over checks;
- effective rank: the layer's mean over heads of eff_rank (out of r = the head's rank);
- attention entropy: at the run's last logit check, the layer's mean over heads of the mean
  attention entropy (nats) of the probe batch's queries (analysis/spectral/logits.py);
- kinds: "content" (and MLA's "rope") are the weight form W_Q W_Kᵀ of each head, "activation" its
  activation form Q Kᵀ on the probe batch, each against the run's null.
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from analysis.spectral.history import SpectralHistory
from analysis.spectral.plots import step_layer_heatmap

VARIANT_ORDER = ("mha", "mla_prerope", "mla")  # the order of seed 000's comparison; others follow by name
VARIANT_LABELS = {"mha": "MHA", "mla_prerope": "MLA-PreRoPE", "mla": "MLA (decoupled RoPE)"}
COLORS = {"mha": "tab:red", "mla_prerope": "tab:orange", "mla": "tab:blue"}


@dataclass
class KindSeries:
    """One spectral kind of one run as (S, L) histories over the checked steps."""

    steps: np.ndarray  # (S,) checked optimizer steps
    ratio: np.ndarray  # (S, L) max over heads of λ_max / edge
    spikes: np.ndarray  # (S, L) spikes summed over heads
    heads_spiking: np.ndarray  # (S, L) heads with at least one spike
    eff_rank: np.ndarray  # (S, L) mean over heads of the effective rank
    rank: int  # r: the number of eigenvalues of a head (the effective rank's maximum)


@dataclass
class RunData:
    """What the study uses of one run of the sweep."""

    variant: str  # attention name (model.attention.name)
    seed: int  # the run's seed
    dir: str  # its run directory's name
    status: str  # done | failed | incomplete
    kinds: dict[str, KindSeries] = field(default_factory=dict)  # per spectral kind
    alerts: dict[str, int] = field(default_factory=dict)  # alerts raised per rule
    alert_keys: dict[str, int] = field(default_factory=dict)  # heads/layers named by those alerts, per rule
    val_loss: tuple[np.ndarray, np.ndarray] | None = None  # (steps, values)
    entropy: np.ndarray | None = None  # (L,) final attention entropy per layer, mean over heads (nats)
    wall_s: float | None = None  # seconds from the job's (last) start to its DONE mark


def kind_series(history: SpectralHistory, kind: str) -> KindSeries:
    """The (S, L) histories of one kind from a run's spectral history."""
    spikes = history.grid(kind, "num_spikes")
    return KindSeries(
        steps=np.asarray(history.steps, dtype=np.int64),
        ratio=history.per_layer(kind, "lambda_max_over_edge", "max"),
        spikes=np.nansum(spikes, axis=2),
        heads_spiking=np.nansum(spikes > 0, axis=2).astype(np.float64),
        eff_rank=history.per_layer(kind, "eff_rank", "mean"),
        rank=int(history.checks[0][f"{kind}/eigs"].shape[-1]),
    )


def alert_counts(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], dict[str, int]]:
    """From alerts.jsonl records: (alerts per rule, heads or layers named by them per rule)."""
    alerts: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    for r in records:
        rule = str(r.get("rule", "?"))
        alerts[rule] += 1
        keys[rule] += len(r.get("keys") or [])
    return dict(alerts), dict(keys)


def first_crossing(steps: np.ndarray, spikes: np.ndarray) -> list[int | None]:
    """Per layer, the first checked step with spikes > 0 (None if the layer never crossed)."""
    out: list[int | None] = []
    for layer in range(spikes.shape[1]):
        hit = np.flatnonzero(spikes[:, layer] > 0)
        out.append(int(steps[hit[0]]) if hit.size else None)
    return out


def run_numbers(run: RunData, kind: str) -> dict[str, Any]:
    """The per-layer numbers of one run and kind (see the module docstring)."""
    s = run.kinds[kind]
    return {
        "checks": int(s.steps.size),
        "last_step": int(s.steps[-1]),
        "rank": s.rank,
        "first_crossing_step": first_crossing(s.steps, s.spikes),
        "peak_spikes": s.spikes.max(axis=0).astype(int).tolist(),
        "peak_spikes_step": [int(s.steps[i]) for i in s.spikes.argmax(axis=0)],
        "final_spikes": s.spikes[-1].astype(int).tolist(),
        "final_heads_spiking": s.heads_spiking[-1].astype(int).tolist(),
        "final_lambda_max_over_edge": np.round(s.ratio[-1], 4).tolist(),
        "initial_eff_rank": np.round(s.eff_rank[0], 4).tolist(),
        "final_eff_rank": np.round(s.eff_rank[-1], 4).tolist(),
        "min_eff_rank": np.round(s.eff_rank.min(axis=0), 4).tolist(),
    }


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, std, min and max over seeds of the values that exist; n of them; None when none do."""
    have = np.array([v for v in values if v is not None], dtype=np.float64)
    if not have.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "of": len(values)}
    return {"mean": round(float(have.mean()), 4), "std": round(float(have.std()), 4),
            "min": round(float(have.min()), 4), "max": round(float(have.max()), 4),
            "n": int(have.size), "of": len(values)}


def ordered_variants(runs: Sequence[RunData]) -> list[str]:
    """The variants present, seed 000's order first."""
    present = {r.variant for r in runs}
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def summarize(runs: Sequence[RunData]) -> dict[str, Any]:
    """Per run and per variant (mean and spread over seeds) the study's numbers, as JSON data."""
    per_run = []
    variants: dict[str, Any] = {}
    for variant in ordered_variants(runs):
        group = sorted((r for r in runs if r.variant == variant), key=lambda r: r.seed)
        entry: dict[str, Any] = {"label": VARIANT_LABELS.get(variant, variant), "seeds": [r.seed for r in group],
                                 "status": [r.status for r in group], "kinds": {}}
        for kind in sorted({k for r in group for k in r.kinds}):
            numbers = [run_numbers(r, kind) for r in group if kind in r.kinds]
            n_layers = len(numbers[0]["peak_spikes"])
            entry["kinds"][kind] = {"rank": numbers[0]["rank"], **{
                key: [stats([n[key][layer] for n in numbers]) for layer in range(n_layers)]
                for key in ("first_crossing_step", "peak_spikes", "final_spikes", "final_heads_spiking",
                            "final_lambda_max_over_edge", "initial_eff_rank", "final_eff_rank", "min_eff_rank")}}
        losses = [float(r.val_loss[1][-1]) if r.val_loss is not None and r.val_loss[1].size else None for r in group]
        entry["final_val_loss"] = stats(losses)
        entropies = [r.entropy for r in group if r.entropy is not None]
        entry["final_attention_entropy"] = [stats([float(e[layer]) for e in entropies])
                                            for layer in range(len(entropies[0]))] if entropies else []
        entry["wall_s"] = stats([r.wall_s for r in group])
        rules = sorted({k for r in group for k in r.alerts})
        entry["alerts"] = {rule: stats([r.alerts.get(rule, 0) for r in group]) for rule in rules}
        entry["alert_keys"] = {rule: stats([r.alert_keys.get(rule, 0) for r in group]) for rule in rules}
        variants[variant] = entry
        for r, loss in zip(group, losses, strict=True):
            per_run.append({"variant": variant, "seed": r.seed, "dir": r.dir, "status": r.status,
                            "final_val_loss": loss, "alerts": r.alerts, "alert_keys": r.alert_keys,
                            "final_attention_entropy": None if r.entropy is None else np.round(r.entropy, 4).tolist(),
                            "wall_s": r.wall_s,
                            "kinds": {kind: run_numbers(r, kind) for kind in r.kinds}})
    return {"definitions": __doc__.split("Definitions used in the numbers", 1)[1].strip(),
            "variants": variants, "runs": per_run}


def _cell(stat: Mapping[str, Any], digits: int = 1, spread: bool = True, none: str = "-") -> str:
    """'mean [min, max]' of a `stats` entry (`none` where no seed has a value)."""
    if stat["mean"] is None:
        return none
    text = f"{stat['mean']:.{digits}f}"
    if spread and stat["n"] > 1:
        text += f" [{stat['min']:.{digits}f}, {stat['max']:.{digits}f}]"
    return text if stat["n"] == stat["of"] else f"{text} ({stat['n']}/{stat['of']})"


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The study's table (one column per variant, mean [min, max] over seeds) from `summarize`'s output:
    per-layer crossings, spikes and ranks of each kind, λ_max/edge, attention entropy, val loss, alerts
    and wall time per run. A crossing that not every seed reached shows (n/of) seeds; a seed whose run has
    not finished is marked with its status (its numbers are those of its last check)."""
    variants = summary["variants"]
    names = list(variants)
    rows = [("seeds", [", ".join(f"{seed}" + ("" if status == "done" else f" ({status})")
                                 for seed, status in zip(variants[v]["seeds"], variants[v]["status"], strict=True))
                       for v in names])]
    kinds = sorted({k for v in names for k in variants[v]["kinds"]}, key=lambda k: ("content", "rope").index(k)
                   if k in ("content", "rope") else 2)
    for kind in kinds:
        present = [variants[v]["kinds"].get(kind) for v in names]

        def per_layer(key: str, digits: int, spread: bool, entries: list = present) -> list[str]:
            none = "never" if key == "first_crossing_step" else "-"
            return [" / ".join(_cell(s, digits, spread, none) for s in e[key]) if e else "-" for e in entries]

        rank = next(e["rank"] for e in present if e)
        rows += [(f"[{kind}] first crossing step per layer", per_layer("first_crossing_step", 0, False)),
                 (f"[{kind}] peak spikes per layer", per_layer("peak_spikes", 1, False)),
                 (f"[{kind}] eff. rank per layer, init (of {rank})", per_layer("initial_eff_rank", 1, False)),
                 (f"[{kind}] eff. rank per layer, final", per_layer("final_eff_rank", 1, False)),
                 (f"[{kind}] eff. rank L0, final", [_cell(e["final_eff_rank"][0]) if e else "-" for e in present]),
                 (f"[{kind}] final max λ_max/edge per layer", per_layer("final_lambda_max_over_edge", 1, False))]
    rows += [("final attention entropy per layer (nats)",
              [" / ".join(_cell(s, 2, False) for s in variants[v]["final_attention_entropy"]) or "-" for v in names]),
             ("final val loss", [_cell(variants[v]["final_val_loss"], 3) for v in names])]
    rules = sorted({rule for v in names for rule in variants[v]["alerts"]})
    rows += [(f"alerts/run: {rule}", [_cell(variants[v]["alerts"][rule]) if rule in variants[v]["alerts"] else "0"
                                       for v in names]) for rule in rules]
    rows += [("wall time per run, s", [_cell(variants[v]["wall_s"], 0) for v in names])]
    header = "| | " + " | ".join(variants[v]["label"] for v in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------- figures
def _common(series: Sequence[KindSeries], attr: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, (seeds, S, L) values) over the steps every run checked (a shorter run truncates)."""
    n = min(s.steps.size for s in series)
    return series[0].steps[:n], np.stack([getattr(s, attr)[:n] for s in series])


def seed_mean_heatmaps(runs: Sequence[RunData], kind: str) -> dict[str, Figure]:
    """Per variant, (step, layer) heatmaps averaged over seeds of max-over-heads λ_max/edge and of
    spike counts, on one colour scale per metric across variants. Keys: '<variant>_<kind>_<metric>'."""
    figures: dict[str, Figure] = {}
    for attr, metric, label in (("ratio", "lambda_max_over_edge", "λ_max / edge"), ("spikes", "spikes", "spikes")):
        panels = {}
        for variant in ordered_variants(runs):
            series = [r.kinds[kind] for r in runs if r.variant == variant and kind in r.kinds]
            if series:
                panels[variant] = _common(series, attr)
        if not panels:
            continue
        vmax = max(float(np.nanmax(v.mean(axis=0))) for _, v in panels.values())
        vmin = 0.0 if attr == "spikes" else min(float(np.nanmin(v.mean(axis=0))) for _, v in panels.values())
        for variant, (steps, values) in panels.items():
            how = "max" if attr == "ratio" else "sum"
            title = (f"{VARIANT_LABELS.get(variant, variant)} [{kind}]: {label} ({how} over heads), "
                     f"mean of {values.shape[0]} seed{'s' if values.shape[0] > 1 else ''}")
            fig = step_layer_heatmap(steps.tolist(), values.mean(axis=0), title, label)
            fig.axes[0].images[0].set_clim(vmin, max(vmax, vmin + 1e-9))
            figures[f"{variant}_{kind}_{metric}"] = fig
    return figures


def eff_rank_figure(runs: Sequence[RunData], kind: str) -> Figure:
    """One panel per layer: mean over heads of the effective rank over steps, per variant the mean
    over seeds (line) and the min-max over seeds (band)."""
    variants = [v for v in ordered_variants(runs) if any(r.variant == v and kind in r.kinds for r in runs)]
    n_layers = max(r.kinds[kind].eff_rank.shape[1] for r in runs if kind in r.kinds)
    cols = min(n_layers, 4)
    rows = -(-n_layers // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows + 0.4), squeeze=False, sharey=True)
    rank = 0
    for variant in variants:
        series = [r.kinds[kind] for r in runs if r.variant == variant and kind in r.kinds]
        rank = max(rank, series[0].rank)
        steps, values = _common(series, "eff_rank")
        for layer in range(values.shape[2]):
            ax = axes.flat[layer]
            ax.plot(steps, values[:, :, layer].mean(axis=0), color=COLORS.get(variant), lw=1.4,
                    label=f"{VARIANT_LABELS.get(variant, variant)} (r={series[0].rank})")
            ax.fill_between(steps, values[:, :, layer].min(axis=0), values[:, :, layer].max(axis=0),
                            color=COLORS.get(variant), alpha=0.2, lw=0)
            ax.set_title(f"layer {layer}", fontsize=9)
    for i, ax in enumerate(axes.flat):
        if i >= n_layers:
            ax.axis("off")
            continue
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, rank * 1.05)
    axes[0, 0].set_ylabel("effective rank", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"[{kind}] effective rank per layer (mean over heads): seed mean, band = min-max over seeds",
                 fontsize=9)
    fig.tight_layout()
    return fig


def alerts_figure(runs: Sequence[RunData]) -> Figure:
    """Alerts raised per rule: per variant the mean over seeds (bar) and each seed's count (dots)."""
    variants = ordered_variants(runs)
    rules = sorted({k for r in runs for k in r.alerts}) or ["(none)"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rules), 3.0))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        group = [r for r in runs if r.variant == variant]
        x = np.arange(len(rules)) + (i - (len(variants) - 1) / 2) * width
        counts = np.array([[r.alerts.get(rule, 0) for rule in rules] for r in group], dtype=np.float64)
        ax.bar(x, counts.mean(axis=0), width, color=COLORS.get(variant), alpha=0.7,
               label=VARIANT_LABELS.get(variant, variant))
        for row in counts:
            ax.scatter(x, row, color="black", s=6, zorder=3)
    ax.set_xticks(np.arange(len(rules)), rules, fontsize=8)
    ax.set_ylabel("alerts per run")
    ax.set_title("alerts raised (alerts.jsonl): mean over seeds, dots = seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def entropy_figure(runs: Sequence[RunData]) -> Figure:
    """Final attention entropy per layer (mean over heads): per variant the mean over seeds (bar) and
    each seed (dots)."""
    variants = [v for v in ordered_variants(runs) if any(r.variant == v and r.entropy is not None for r in runs)]
    n_layers = max((r.entropy.size for r in runs if r.entropy is not None), default=0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * max(n_layers, 1), 3.0))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        values = np.stack([r.entropy for r in runs if r.variant == variant and r.entropy is not None])  # (seeds, L)
        x = np.arange(values.shape[1]) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, values.mean(axis=0), width, color=COLORS.get(variant), alpha=0.7,
               label=f"{VARIANT_LABELS.get(variant, variant)} ({values.shape[0]} seeds)")
        for row in values:
            ax.scatter(x, row, color="black", s=6, zorder=3)
    ax.set_xticks(np.arange(n_layers), [f"layer {layer}" for layer in range(n_layers)], fontsize=8)
    ax.set_ylabel("attention entropy (nats)")
    ax.set_title("final attention entropy on the probe batch, mean over heads; dots = seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def val_loss_figure(runs: Sequence[RunData]) -> Figure:
    """Validation loss over steps: per variant the mean over seeds and the min-max band."""
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    for variant in ordered_variants(runs):
        curves = [r.val_loss for r in runs if r.variant == variant and r.val_loss is not None and r.val_loss[0].size]
        if not curves:
            continue
        n = min(c[0].size for c in curves)
        steps, values = curves[0][0][:n], np.stack([c[1][:n] for c in curves])
        ax.plot(steps, values.mean(axis=0), marker="o", ms=3, color=COLORS.get(variant),
                label=f"{VARIANT_LABELS.get(variant, variant)} ({len(curves)} seeds)")
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=COLORS.get(variant), alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("val/loss")
    ax.set_title("validation loss: seed mean, band = min-max", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
