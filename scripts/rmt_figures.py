"""Figures and numbers of the seed-000 study (conf/experiment/rmt_mla.yaml) from its sweep directory.

    python scripts/rmt_figures.py runs/rmt_mla [--out results/rmt_mla] [--kind content]

Per variant (attention name) over its seeds: (step, layer) heatmaps of λ_max/edge and spike
counts (seed mean), effective rank per layer over steps (mean and min-max band), the alerts each
run raised (alerts.jsonl), validation loss, final attention entropy per layer; summary.json holds the
numbers (analysis/study/rmt_study.py).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(ROOT))

from analysis.spectral.history import LOGITS_FILE, load_history, load_logit_history  # noqa: E402
from analysis.study import compare  # noqa: E402
from analysis.study.rmt_study import (  # noqa: E402
    RunData,
    alert_counts,
    alerts_figure,
    eff_rank_figure,
    entropy_figure,
    kind_series,
    seed_mean_heatmaps,
    summarize,
    val_loss_figure,
)
from trainer.run_results import job_status, metric_rows, sweep_jobs  # noqa: E402


def load_run(job: Path) -> RunData | None:
    """One job directory of the sweep as RunData (None when it has no spectral history yet)."""
    if not any((job / "spectra").glob("step*.npz")):
        return None
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    history = load_history(job / "spectra")
    alerts_file = job / "alerts.jsonl"
    records = [json.loads(line) for line in alerts_file.read_text().splitlines() if line.strip()] \
        if alerts_file.exists() else []
    alerts, keys = alert_counts(records)
    steps, values = compare.series(metric_rows(job), "val/loss")
    entropy = load_logit_history(job / LOGITS_FILE).entropy[-1].mean(axis=-1) if (job / LOGITS_FILE).exists() else None
    status = job_status(job)
    started = (job / ".hydra" / "config.yaml").stat().st_mtime  # Hydra rewrites it when a job (re)starts
    wall = (job / "DONE").stat().st_mtime - started if status == "done" else None
    return RunData(variant=str(cfg.model.attention.name), seed=int(cfg.seed), dir=job.name, status=status,
                   kinds={k: kind_series(history, k) for k in history.kinds}, alerts=alerts, alert_keys=keys,
                   val_loss=(steps, values) if steps.size else None, entropy=entropy, wall_s=wall)


def render(sweep_dir: Path, out: Path, kinds: list[str] | None = None, dpi: int = 90) -> dict:
    """Write the PNGs and summary.json of `sweep_dir` into `out`; return summary.json's content."""
    jobs = sweep_jobs(sweep_dir)
    runs = [r for r in (load_run(j) for j in jobs) if r is not None]
    if not runs:
        raise FileNotFoundError(f"{sweep_dir} holds no job with a spectral history (*/spectra/step*.npz)")
    out.mkdir(parents=True, exist_ok=True)
    all_kinds = sorted({k for r in runs for k in r.kinds})
    figures = {}
    for kind in kinds or all_kinds:
        if kind not in all_kinds:
            continue
        figures.update(seed_mean_heatmaps(runs, kind))
        figures[f"eff_rank_{kind}"] = eff_rank_figure(runs, kind)
    figures["alerts"] = alerts_figure(runs)
    figures["val_loss"] = val_loss_figure(runs)
    figures["attention_entropy"] = entropy_figure(runs)
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=dpi)
        plt.close(fig)
    summary = {"sweep": str(sweep_dir), "jobs": len(jobs), "runs_with_spectra": len(runs), **summarize(runs),
               "figures": sorted(f"{n}.png" for n in figures)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: render the figures of a sweep directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory, e.g. runs/rmt_mla")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default SWEEP_DIR/rmt_figures)")
    parser.add_argument("--kind", action="append", default=None,
                        help="spectral kind(s) to draw (content, rope, activation; default: every kind present)")
    parser.add_argument("--dpi", type=int, default=90, help="PNG resolution (default 90: small committed files)")
    args = parser.parse_args(argv)
    out = args.out or args.sweep_dir / "rmt_figures"
    try:
        summary = render(args.sweep_dir, out, args.kind, args.dpi)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for variant, entry in summary["variants"].items():
        content = entry["kinds"].get("content", {})
        first = [s["mean"] for s in content.get("first_crossing_step", [])]
        rank = [s["mean"] for s in content.get("final_eff_rank", [])]
        print(f"{variant:<12} seeds={entry['seeds']} val/loss={entry['final_val_loss']['mean']} "
              f"first crossing (mean per layer)={first} final eff. rank={rank}")
    print(f"wrote {len(summary['figures'])} figures and summary.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
