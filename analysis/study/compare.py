"""Comparing the runs of a sweep: metric series, decode-cache cost, spectral health, one HTML page.

Pure pieces (torch, numpy, matplotlib; no Lightning, Hydra or W&B): the rows they take are
metric dicts however they were logged (CSV or W&B), read by trainer/run_results.py.
"""

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch

from models.gpt import GPT, KVCache


@dataclass
class Variant:
    """What the report shows of one run of a sweep."""

    label: str  # the overrides that tell it apart from the other runs
    dir: str  # its run directory's name
    status: str  # done | failed | incomplete
    val_loss: tuple[np.ndarray, np.ndarray] | None = None  # (steps, values)
    tokens_per_sec: float | None = None  # median training throughput
    kv_bytes: dict[str, float] = field(default_factory=dict)  # see kv_cache_bytes
    spikes: tuple[np.ndarray, np.ndarray] | None = None  # (steps, (S, L) spike counts per layer)
    train_loss: tuple[np.ndarray, np.ndarray] | None = None  # (steps, values)
    eff_rank: float | None = None  # mean effective rank of the content heads at the last check
    alerts: dict[str, int] = field(default_factory=dict)  # alert count per level


def variant_labels(overrides: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Per run, the `key=value` overrides whose value is not shared by every run (its variant)."""
    parsed = {name: dict(o.lstrip("+~").split("=", 1) for o in ovr if "=" in o) for name, ovr in overrides.items()}
    keys = sorted({k for p in parsed.values() for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed.values()}) > 1]
    return {name: ",".join(f"{k}={p[k]}" for k in varying if k in p) or name for name, p in parsed.items()}


def series(rows: Sequence[Mapping[str, float]], key: str, step_key: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`, sorted by step; a step logged twice (a resumed run) keeps the last."""
    by_step = {int(r[step_key]): float(r[key]) for r in rows if r.get(key) is not None and r.get(step_key) is not None}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def median_of(rows: Sequence[Mapping[str, float]], key: str, skip_first: int = 1) -> float | None:
    """The median of a metric's readings after the first `skip_first` (warm-up), or None."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    values = values[skip_first:] or values
    return float(np.median(values)) if values else None


@torch.no_grad()
def kv_cache_bytes(model: GPT, n_tokens: int = 16) -> dict[str, float]:
    """Decode-cache cost measured on the model's real cache, per layer.

    Prefills `n_tokens` tokens into a fresh KVCache, then decodes one more. Returns
    `per_token`: mean over layers of LayerCache.nbytes() / n_tokens after the prefill;
    `marginal`: mean over layers of the bytes the one extra token added (what context length
    costs; fixed-size state such as KV shifting's previous key/value is not in it);
    `itemsize`: bytes per cached element (the model's dtype).
    """
    model.eval()
    n_tokens = min(n_tokens, model.config.block_size - 1)
    idx = torch.zeros(1, n_tokens, dtype=torch.long, device=next(model.parameters()).device)
    cache = KVCache(model.config.n_layer)
    model(idx, cache=cache)
    prefill = np.array([layer.nbytes() for layer in cache.layers], dtype=np.float64)
    model(idx[:, :1], cache=cache)
    grown = np.array([layer.nbytes() for layer in cache.layers], dtype=np.float64)
    itemsize = next(iter(cache.layers[0].tensors.values())).element_size() if cache.layers[0].tensors else 0
    return {"per_token": float(prefill.mean() / n_tokens), "marginal": float((grown - prefill).mean()),
            "itemsize": float(itemsize)}


# ----------------------------------------------------------------- figures
def _colors(n: int) -> list:
    return [plt.get_cmap("tab10")(i % 10) for i in range(n)]


def loss_figure(variants: Sequence[Variant]):
    """Validation loss (markers) and training loss (thin line, same colour) of every run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, color in zip(variants, _colors(len(variants)), strict=True):
        if v.train_loss is not None and len(v.train_loss[0]):
            ax.plot(*v.train_loss, lw=0.8, alpha=0.5, color=color, label=f"_train {v.label}")  # _: not in legend
        if v.val_loss is not None and len(v.val_loss[0]):
            ax.plot(*v.val_loss, marker="o", ms=3, color=color, label=v.label)
    ax.set(xlabel="optimizer step", ylabel="loss", title="validation loss (markers) and train loss (thin)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bar_figure(variants: Sequence[Variant], values: Sequence[float | None], ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [v.label for v in variants]
    heights = [np.nan if x is None else x for x in values]
    bars = ax.bar(range(len(labels)), heights, color=_colors(len(labels)))
    ax.bar_label(bars, fmt="%.4g", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def spikes_figure(variants: Sequence[Variant]):
    """One panel per run: spectral spikes (heads' eigenvalues beyond the null) per layer over steps."""
    shown = [v for v in variants if v.spikes is not None]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.6 * max(1, len(shown)), 3.4), squeeze=False,
                             sharey=True)
    for ax, v in zip(axes[0], shown, strict=False):
        steps, counts = v.spikes
        for layer in range(counts.shape[1]):
            ax.plot(steps, counts[:, layer], marker=".", label=f"L{layer}")
        ax.set(title=v.label, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("spikes (sum over heads)")
    if shown:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("spectral health: QK spikes per layer")
    fig.tight_layout()
    return fig


def html_page(title: str, variants: Sequence[Variant], images: Sequence[tuple[str, str]]) -> str:
    """index.html: a table of the runs and the figures (file name, caption)."""

    def cell(x: object, fmt: str = "{:.4g}") -> str:
        return "–" if x is None else html.escape(fmt.format(x) if isinstance(x, float) else str(x))

    rows = []
    for v in variants:
        final = float(v.val_loss[1][-1]) if v.val_loss is not None and len(v.val_loss[1]) else None
        last_spikes = int(v.spikes[1][-1].sum()) if v.spikes is not None else None
        train = float(v.train_loss[1][-1]) if v.train_loss is not None and len(v.train_loss[1]) else None
        alerts = " / ".join(str(v.alerts.get(level, 0)) for level in ("INFO", "WARN", "ERROR"))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            cell(v.label), cell(v.status), cell(final), cell(train), cell(v.eff_rank), cell(alerts),
            cell(v.tokens_per_sec, "{:.0f}"),
            cell(v.kv_bytes.get("marginal"), "{:.0f}"), cell(v.kv_bytes.get("per_token"), "{:.1f}"),
            cell(last_spikes), f"<code>{html.escape(v.dir)}</code>")) + "</tr>")
    head = ("variant", "status", "final val/loss", "final train/loss", "effective rank (last check)",
            "alerts INFO / WARN / ERROR", "tokens/s", "KV bytes/token/layer",
            "cache bytes/token/layer (16-token prefill)", "spikes at last check", "run directory")
    figures = "\n".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                        "</figcaption></figure>" for f, c in images)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>
{chr(10).join(rows)}
</table>
{figures}
</body></html>
"""
