"""What a spectral or logit check logs: scalars for every logger, and the W&B-only histograms, figures
and per-head table. Pure rendering of a report; the callback (callbacks/spectral.py) decides when."""

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from analysis.spectral import SpectralAnalyzer, SpectralReport, benjamini_hochberg
from analysis.spectral.health import HEAD_METRICS
from analysis.spectral.logits import LogitStats
from analysis.spectral.plots import esd_grid, layer_head_heatmap, null_grid


def logit_scalars(stats: LogitStats) -> dict[str, float]:
    """A logit check as scalars: logits/max_logit, logits/bound, logits/entropy_min, and per layer."""
    out = {"logits/max_logit": float(stats.max_logit.max()), "logits/bound": float(stats.bound.max()),
           "logits/entropy_min": float(stats.entropy.min())}
    for layer in range(stats.max_logit.shape[0]):
        out[f"logits/L{layer}/max_logit"] = float(stats.max_logit[layer].max())
        out[f"logits/L{layer}/bound"] = float(stats.bound[layer].max())
        out[f"logits/L{layer}/entropy_min"] = float(stats.entropy[layer].min())
        out[f"logits/L{layer}/entropy_mean"] = float(stats.entropy[layer].mean())
    return out


def probe_meta(factors: list) -> dict[str, float]:
    """The probe's per-variant scalars (KV-shift α/β, MLA ranks) as spectral/meta/L<l>/<kind>/<key>."""
    return {f"L{layer}/{f.kind}/{key}": float(value)
            for layer, kinds in enumerate(factors) for f in kinds for key, value in f.meta.items()}


def report_scalars(report: SpectralReport, meta: dict[str, float], checks: int, bh_q: float,
                   per_head: bool) -> dict[str, float]:
    """A spectral check as scalars: totals per kind, per-layer summaries (per head with `per_head`), the
    probe's meta; heads flagged by Benjamini-Hochberg at FDR `bh_q`."""
    out = {"spectral/check_seconds": report.seconds, "spectral/checks": float(checks)}
    for kind, hs in report.heads.items():
        ratio = hs.lambda_max / hs.edge
        spikes = torch.where(hs.finite, hs.num_spikes, 0)
        out[f"spectral/{kind}/spikes_total"] = float(spikes.sum())
        out[f"spectral/{kind}/heads_flagged_bh"] = float(benjamini_hochberg(hs.pvalue, bh_q).sum())
        out[f"spectral/{kind}/non_finite_heads"] = float((~hs.finite).sum())
        for layer in range(ratio.shape[0]):
            p = f"spectral/{kind}/L{layer}"
            out[f"{p}/lambda_max_over_edge"] = float(ratio[layer].nan_to_num(0).max())
            out[f"{p}/spikes"] = float(spikes[layer].sum())
            for name in ("eff_rank", "stable_rank", "tw_z", "alpha", "ks", "overlap", "sigma2"):
                out[f"{p}/{name}"] = float(getattr(hs, name)[layer].nanmean())
            out[f"{p}/spectral_norm"] = float(hs.spectral_norm[layer].nan_to_num(0).max())
            if per_head:
                for head in range(ratio.shape[1]):
                    for name in HEAD_METRICS:
                        out[f"{p}H{head}/{name}"] = float(getattr(hs, name)[layer, head])
    for key, value in meta.items():
        out[f"spectral/meta/{key}"] = value
    return out


def wandb_payload(report: SpectralReport, step: int, analyzer: SpectralAnalyzer, bins: int,
                  images: bool) -> dict[str, Any]:
    """The W&B-only part of a check: per-layer ESD histograms of `bins` bins and, with `images`, the
    figures and the per-head table."""
    import wandb

    payload: dict[str, Any] = {"trainer/global_step": step}
    for kind, hs in report.heads.items():
        for layer in range(hs.eigs.shape[0]):
            values = hs.eigs[layer].flatten()
            values = values[torch.isfinite(values)].numpy()
            if values.size:
                counts, edges = np.histogram(values, bins=bins)
                payload[f"spectral_esd/{kind}/L{layer}"] = wandb.Histogram(np_histogram=(counts, edges))
    if images:
        for kind, fig in figures(report, analyzer).items():
            payload[f"spectral_images/{kind}"] = wandb.Image(fig)
            plt.close(fig)
        payload["spectral/heads"] = wandb.Table(*heads_table(report))
    return payload


def figures(report: SpectralReport, analyzer: SpectralAnalyzer) -> dict[str, Any]:
    """Each kind's ESD per layer on log axes with the null density, edge and spike threshold, and its layer x
    head heatmap of λ_max/edge on a log colour scale with values."""
    figures = {}
    for kind, hs in report.heads.items():
        eigs, edge = hs.eigs.numpy(), hs.edge.numpy()
        grid = null_grid(eigs, edge)
        density = analyzer.null_density(kind, hs.top_u.shape[-1], eigs.shape[-1], torch.from_numpy(grid))
        figures[f"{kind}_esd"] = esd_grid(eigs, edge, grid, None if density is None else density.numpy(),
                                          title=f"{kind} ESD vs null", log_x=True, threshold=hs.threshold.numpy())
        figures[f"{kind}_lambda_max_over_edge"] = layer_head_heatmap(
            (hs.lambda_max / hs.edge).numpy(), f"{kind}: λ_max / edge", log_color=True, annotate=True)
    return figures


def heads_table(report: SpectralReport) -> tuple[list[str], list[list]]:
    """Columns and one row per (kind, layer, head) of the per-head metrics."""
    columns = ["kind", "layer", "head", *HEAD_METRICS]
    rows = []
    for kind, hs in report.heads.items():
        for layer in range(hs.eigs.shape[0]):
            for head in range(hs.eigs.shape[1]):
                rows.append([kind, layer, head, *(float(getattr(hs, m)[layer, head]) for m in HEAD_METRICS)])
    return columns, rows
