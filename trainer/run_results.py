"""Reading finished runs and sweeps back: the objective, the logged metrics, the model, the sweep report.

`objective` is what train.py returns to a sweeper (Optuna minimises it); `metric_rows` reads a
run's metrics from its CSV log or its .wandb files; `build_report` (scripts/compare_runs.py)
gathers each run's metrics, measures its decode cache on the model rebuilt from last.ckpt, loads
its spectral history and renders the comparison with analysis/study/compare.py.
"""

import csv
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf

from analysis.files import write_json
from trainer.checkpoint_io import CorruptCheckpointError, load_verified
from trainer.run_dir import RunDirectory

if TYPE_CHECKING:
    from models import GPT

log = logging.getLogger(__name__)

FAILED_FILE = "FAILED"  # written by the sweep bookkeeping (trainer/sweep.py) when a job raised


def objective(run_dir: str | Path, monitor: str = "val/loss") -> float | None:
    """The best `monitor` value recorded in the run's last.ckpt (by a ModelCheckpoint watching
    it), or None: the value a sweeper such as Optuna minimises."""
    path = RunDirectory(run_dir).last_checkpoint
    if not path.exists():
        return None
    try:
        ckpt = load_verified(path)
    except CorruptCheckpointError as e:
        log.error("no objective for %s: %s", run_dir, e)
        return None
    for state in ckpt.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("monitor") == monitor and state.get("best_model_score") is not None:
            value = float(state["best_model_score"])
            return value if math.isfinite(value) else None
    return None


def sweep_jobs(sweep_dir: str | Path) -> list[Path]:
    """The job directories of a sweep (those Hydra saved overrides in), by name."""
    return sorted(p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml"))


def job_status(run_dir: Path) -> str:
    run = RunDirectory(run_dir)
    return "done" if run.is_done() else "failed" if (run.path / FAILED_FILE).exists() else "incomplete"


def metric_rows(run_dir: str | Path) -> list[dict[str, float]]:
    """A run's logged metrics, one dict per logging call, each with its optimizer `step`.

    From the CSV logger's csv/metrics.csv when there is one, else from every W&B session's
    .wandb file, oldest first (a resumed run has one per session)."""
    run_dir = Path(run_dir)
    csv_file = run_dir / "csv" / "metrics.csv"
    if csv_file.exists():
        with open(csv_file, newline="") as f:
            return [_numeric_row(row) for row in csv.DictReader(f)]
    from trainer.wandb_records import history

    rows = []
    for wandb_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")) + sorted(
            run_dir.glob("wandb/run-*/run-*.wandb")):
        for row in history(wandb_file):
            if "trainer/global_step" in row:
                rows.append({k: v for k, v in row.items() if isinstance(v, (int, float))}
                            | {"step": row["trainer/global_step"]})
    return rows


def _numeric_row(row: dict[str | None, str | list[str] | None]) -> dict[str, float]:
    """The numbers of a CSV row; empty cells, text and the overflow of a torn row (key None) are left out."""
    out = {}
    for key, value in row.items():
        if isinstance(key, str) and isinstance(value, str) and value:
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def read_alerts(run: RunDirectory) -> list[dict]:
    """The run's alert records (alerts.jsonl), oldest first."""
    if not run.alerts_file.exists():
        return []
    return [json.loads(line) for line in run.alerts_file.read_text().splitlines() if line.strip()]


def model_from_checkpoint(path: str | Path) -> "GPT":
    """The GPT a LitGPT checkpoint holds, rebuilt from its hyper_parameters, with its weights.

    The file is verified and loaded with weights_only=True (CorruptCheckpointError otherwise)."""
    from trainer.checkpoints import load_lit_gpt

    return load_lit_gpt(path).model


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Compare a sweep's runs: val and train loss curves, tokens/s, KV-cache bytes/token/layer measured on
    each run's model, spectral spikes per layer over time, effective rank at the last check, alert counts.
    Writes PNGs, index.html and compare.json to `out_dir` (default <sweep_dir>/report); returns compare.json."""
    import matplotlib.pyplot as plt

    from analysis.spectral.history import CHECK_GLOB, load_history
    from analysis.study import compare

    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    jobs = sweep_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no Hydra job directories (*/.hydra/overrides.yaml)")
    ignore = ("paths.", "hydra.")
    labels = compare.variant_labels({
        j.name: [o for o in OmegaConf.load(j / ".hydra" / "overrides.yaml") if not o.lstrip("+~").startswith(ignore)]
        for j in jobs})
    variants = []
    for job in jobs:
        rows = metric_rows(job)
        v = compare.Variant(label=labels[job.name], dir=job.name, status=job_status(job))
        steps, values = compare.series(rows, "val/loss")
        v.val_loss = (steps, values) if len(steps) else None
        v.tokens_per_sec = compare.median_of(rows, "train/device/items_per_sec")
        run = RunDirectory(job)
        if run.last_checkpoint.exists():
            try:
                v.kv_bytes = compare.kv_cache_bytes(model_from_checkpoint(run.last_checkpoint))
            except CorruptCheckpointError as e:
                log.error("%s: no KV-cache figure: %s", job.name, e)
        steps, values = compare.series(rows, "train/loss")
        v.train_loss = (steps, values) if len(steps) else None
        if any(run.spectra_dir.glob(CHECK_GLOB)):
            hist = load_history(run.spectra_dir)
            v.spikes = (np.array(hist.steps), hist.per_layer("content", "num_spikes", "sum"))
            v.eff_rank = float(np.nanmean(hist.latest("content")["eff_rank"]))
        levels = [a["level"] for a in read_alerts(run)]
        v.alerts = {level: levels.count(level) for level in ("INFO", "WARN", "ERROR")}
        variants.append(v)

    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "val_loss.png": (compare.loss_figure(variants),
                         "validation loss (markers) and training loss (thin lines) over optimizer steps"),
        "tokens_per_sec.png": (compare.bar_figure(variants, [v.tokens_per_sec for v in variants], "tokens/s",
                                                  "training throughput (median, train/device/items_per_sec)"),
                               "training throughput"),
        "kv_cache_bytes.png": (compare.bar_figure(variants, [v.kv_bytes.get("marginal") for v in variants],
                                                  "bytes", "KV cache per token per layer (measured)"),
                               "decode cache bytes per token per layer, measured on each run's model"),
    }
    if any(v.spikes is not None for v in variants):
        figures["spectral_spikes.png"] = (compare.spikes_figure(variants), "spectral spikes per layer over steps")
    for name, (fig, _) in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    title = f"sweep {sweep_dir.name}: {len(variants)} runs"
    (out / "index.html").write_text(compare.html_page(title, variants, [(n, c) for n, (_, c) in figures.items()]))
    result = {"sweep": sweep_dir.name, "runs": [{
        "label": v.label, "dir": v.dir, "status": v.status,
        "val_loss": {"steps": v.val_loss[0].tolist(), "values": v.val_loss[1].tolist()} if v.val_loss else None,
        "tokens_per_sec": v.tokens_per_sec, "kv_cache_bytes": v.kv_bytes,
        "spikes_per_layer": {"steps": v.spikes[0].tolist(), "counts": v.spikes[1].tolist()} if v.spikes else None,
        "train_loss": {"steps": v.train_loss[0].tolist(), "values": v.train_loss[1].tolist()}
        if v.train_loss else None,
        "eff_rank": v.eff_rank, "alerts": v.alerts,
    } for v in variants], "files": sorted([*figures, "index.html"])}
    write_json(out / "compare.json", result)
    return result
