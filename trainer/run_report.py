"""One run's report as a single HTML file, for reading offline instead of the W&B page.

Sections: loss and validation loss with the alerts marked; the alerts as a table; per QK kind, the
latest ESD on log axes with the null density, edge and spike threshold, the layer x head heatmap of
λ_max/edge on a log colour scale with values, and λ_max/edge, spikes and effective rank per layer
over the checks; the attention-logit checks; the run's config. Figures come from
analysis/spectral/plots.py, the page from analysis/study/html_page.py.
"""

import html
from pathlib import Path

import torch
from omegaconf import OmegaConf

from analysis.files import write_text
from analysis.spectral.history import CHECK_GLOB, SpectralHistory, load_history, load_logit_history
from analysis.spectral.nulls import NULLS
from analysis.spectral.plots import (
    esd_grid,
    layer_head_heatmap,
    lines_over_steps,
    loss_with_alerts,
    null_grid,
    step_layer_heatmap,
)
from analysis.study.compare import series
from analysis.study.html_page import figure_html, page, table_html
from trainer.run_dir import RunDirectory
from trainer.run_results import metric_rows, read_alerts

ALERT_TEXT_CHARS = 240  # of an alert's text in the table; alerts.jsonl has all of it


def alerts_section(alerts: list[dict]) -> str:
    if not alerts:
        return "<p>No alerts.</p>"
    rows = [(a["step"], a["level"], a["rule"], len(a.get("keys", [])), ", ".join(a.get("worst", [])[:3]),
             a["text"][:ALERT_TEXT_CHARS] + ("…" if len(a["text"]) > ALERT_TEXT_CHARS else "")) for a in alerts]
    return table_html(("step", "level", "rule", "keys", "worst 3", "details"), rows, [a["level"] for a in alerts])


def kind_section(history: SpectralHistory, kind: str, null: str | None, fallback_dim: int) -> str:
    """The figures of one QK kind: latest ESD vs the null, latest heatmap, per-layer histories."""
    steps, latest = history.steps, history.latest(kind)
    eigs, edge = latest["eigs"], latest["edge"]
    d = int(latest["input_dim"]) if "input_dim" in latest else fallback_dim  # older histories lack it
    grid = null_grid(eigs, edge)
    density = NULLS[null].density if null in NULLS else None
    curve = None if density is None else density(torch.from_numpy(grid), eigs.shape[-1] / d).numpy()
    law = f"the {null} null at aspect r/d = {eigs.shape[-1]}/{d}" if curve is not None else (
        f"the {null} null has no single density (its law is per head): edges only")
    parts = [
        figure_html(esd_grid(eigs, edge, grid, curve, title=f"{kind} ESD at step {steps[-1]}", log_x=True,
                             threshold=latest.get("threshold")),
                    f"Eigenvalues of every head's normalised W_Q W_K^T ({kind}) per layer at step {steps[-1]}, "
                    f"log axes; black: {law}; red: bulk edge; orange: spike threshold (heads' medians)."),
        figure_html(layer_head_heatmap(latest["lambda_max"] / edge, f"{kind} at step {steps[-1]}: λ_max / edge",
                                       log_color=True, annotate=True),
                    "λ_max over the bulk edge per head (above 1: beyond the null's edge), log colour scale."),
    ]
    if len(steps) > 1:
        parts += [
            figure_html(step_layer_heatmap(steps, history.per_layer(kind, "lambda_max_over_edge", "max"),
                                           f"{kind}: max over heads of λ_max / edge", "λ_max / edge"),
                        "Per layer over the checks: the largest λ_max / edge of its heads."),
            figure_html(lines_over_steps(steps, history.per_layer(kind, "num_spikes", "sum"),
                                         f"{kind}: spikes per layer", "spikes"),
                        "Eigenvalues beyond the spike threshold, summed over each layer's heads."),
            figure_html(lines_over_steps(steps, history.per_layer(kind, "eff_rank", "mean"),
                                         f"{kind}: mean effective rank per layer", "effective rank"),
                        "Effective rank (exp of the spectral entropy), mean over each layer's heads."),
        ]
    return "\n".join(parts)


def logits_section(path: Path) -> str:
    logits = load_logit_history(path)
    return "\n".join([
        figure_html(lines_over_steps(logits.steps, logits.max_logit.max(axis=2),
                                     "max attention logit on the probe batch (max over heads)", "max |logit|",
                                     log_y=True), "Largest pre-softmax attention logit per layer on a fixed batch."),
        figure_html(lines_over_steps(logits.steps, logits.bound.max(axis=2),
                                     "weight-only logit bound (max over heads)", "bound", log_y=True),
                    "The bound on any logit from the weights alone, per layer."),
        figure_html(lines_over_steps(logits.steps, logits.entropy.min(axis=2),
                                     "attention entropy (min over heads)", "nats"),
                    "Lowest attention entropy of a head per layer (near 0: a head attends to one token)."),
    ])


def build_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default <run_dir>/report.html) and return its path."""
    run_dir = Path(run_dir)
    run = RunDirectory(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: {run_dir} is not a qkscope run directory")
    cfg = OmegaConf.load(config_file)
    null = OmegaConf.select(cfg, "spectral.null_model", default=None, throw_on_resolution_failure=False)
    d_model = int(OmegaConf.select(cfg, "model.d_model", default=0, throw_on_resolution_failure=False) or 1)
    alerts = read_alerts(run)
    rows = metric_rows(run_dir)
    curves = {k: series(rows, k) for k in ("train/loss", "val/loss")}
    curves = {k: v for k, v in curves.items() if v[0].size}

    sections = []
    if curves:
        sections.append(("Loss and validation loss, with alerts", figure_html(
            loss_with_alerts(curves, alerts), "Training and validation loss; markers: alerts at their step "
            "(dot INFO, x WARN, X ERROR), labelled with their rules.")))
    sections.append((f"Alerts ({len(alerts)})", alerts_section(alerts)))
    checks = ""
    if any(run.spectra_dir.glob(CHECK_GLOB)):
        history = load_history(run.spectra_dir)
        checks = f"{len(history.steps)} spectral checks (steps {history.steps[0]}..{history.steps[-1]})"
        for kind in history.kinds:
            sections.append((f"Spectral health of W_Q W_K^T: {kind}", kind_section(history, kind, null, d_model)))
    if run.logits_file.exists():
        sections.append(("Attention logits", logits_section(run.logits_file)))
    sections.append(("Run configuration", f"<pre>{html.escape(OmegaConf.to_yaml(cfg))}</pre>"))

    levels = {lv: sum(a["level"] == lv for a in alerts) for lv in ("INFO", "WARN", "ERROR")}
    val = curves.get("val/loss")
    intro = "; ".join(x for x in (
        f"run {run_dir.name}", "DONE" if run.is_done() else "not finished",
        f"final val/loss {val[1][-1]:.4f} at step {int(val[0][-1])}" if val is not None else "",
        checks, "alerts: " + ", ".join(f"{n} {lv}" for lv, n in levels.items())) if x)
    path = Path(out) if out is not None else run_dir / "report.html"
    write_text(path, page(f"qkscope run report: {run_dir.name}", intro, sections))
    return path
