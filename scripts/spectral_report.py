"""Render a run's spectral history (RUN_DIR/spectra/step*.npz), its logit checks (RUN_DIR/logits.jsonl)
and its loss with the alerts marked on it into PNGs and one HTML page.

    python scripts/spectral_report.py runs/default/default [--out DIR]
"""

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from analysis.spectral.history import load_history, load_logit_history
from analysis.spectral.plots import esd_grid, layer_head_heatmap, lines_over_steps, loss_with_alerts, step_layer_heatmap
from analysis.study.compare import series
from trainer.run_dir import RunDirectory
from trainer.run_results import metric_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory holding spectra/step*.npz")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/report)")
    args = parser.parse_args()
    run = RunDirectory(args.run_dir)
    history = load_history(run.spectra_dir)
    out = args.out or args.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for kind in history.kinds:
        steps = history.steps
        ratio = history.per_layer(kind, "lambda_max_over_edge", "max")
        figures[f"{kind}_lambda_max_over_edge"] = step_layer_heatmap(
            steps, ratio, f"{kind}: max over heads of λ_max / edge", "λ_max / edge")
        figures[f"{kind}_spikes"] = lines_over_steps(
            steps, history.per_layer(kind, "num_spikes", "sum"), f"{kind}: spikes per layer", "spikes")
        figures[f"{kind}_eff_rank"] = lines_over_steps(
            steps, history.per_layer(kind, "eff_rank", "mean"), f"{kind}: mean effective rank", "effective rank")
        latest = history.latest(kind)
        figures[f"{kind}_latest_heatmap"] = layer_head_heatmap(
            latest["lambda_max"] / latest["edge"], f"{kind} at step {steps[-1]}: λ_max / edge")
        figures[f"{kind}_latest_esd"] = esd_grid(latest["eigs"], latest["edge"], title=f"{kind} ESD, step {steps[-1]}")
    if run.logits_file.exists():
        logits = load_logit_history(run.logits_file)
        figures["logits_max_logit"] = lines_over_steps(
            logits.steps, logits.max_logit.max(axis=2), "max attention logit on the probe batch (max over heads)",
            "max |logit|", log_y=True)
        figures["logits_bound"] = lines_over_steps(
            logits.steps, logits.bound.max(axis=2), "weight-only logit bound (max over heads)", "bound", log_y=True)
        figures["logits_entropy"] = lines_over_steps(
            logits.steps, logits.entropy.min(axis=2), "attention entropy (min over heads)", "nats")
    alerts_file = run.alerts_file
    alerts = [json.loads(line) for line in alerts_file.read_text().splitlines()] if alerts_file.exists() else []
    steps, loss = series(metric_rows(args.run_dir), "train/loss")  # csv/metrics.csv, else the .wandb files
    if steps.size:
        figures["loss_with_alerts"] = loss_with_alerts({"train/loss": (steps, loss)}, alerts)
    lines = [f"<h1>Spectral report: {args.run_dir}</h1>", f"<p>{len(history.steps)} checks, steps "
             f"{history.steps[0]}..{history.steps[-1]}</p>"]
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        lines.append(f"<h3>{name}</h3><img src='{name}.png'>")
    (out / "index.html").write_text("\n".join(lines))
    print(f"wrote {len(figures)} figures and index.html to {out}")


if __name__ == "__main__":
    main()
