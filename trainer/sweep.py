"""Resumable sweeps: Hydra callbacks for a multirun's bookkeeping, and what a sweep report reads.

A sweep is a Hydra multirun (`python -m trainer.train +sweep=attention_variants`, conf/sweep/).
Each job's directory is a pure function of its overrides (conf/hydra/default.yaml), so rerunning
the same command finds the same directories, and train.py skips a job marked DONE and resumes
the others from checkpoints/last.ckpt with their own W&B run ids. Hydra has no sweep resume of
its own (hydra issue #3328); `SweepBookkeeping`, listed under `hydra.callbacks`, adds the rest:

    on_job_start     an earlier attempt's FAILED is removed: the job is being retried
    on_job_end       FAILED (error and traceback) if the job raised; <job>/job.json, this
                     attempt's outcome; the W&B run is finished, so the next job run by this
                     process starts its own; <sweep>/sweep.json refreshed
    on_multirun_end  <sweep>/sweep.json: every job of this invocation, done | skipped | failed |
                     incomplete, with counts

Hydra 1.3's BasicLauncher runs every job of a batch even when one raises (the BasicSweeper's
default max_batch_size=null makes the whole grid one batch), then the sweeper re-raises the
first failure (exit status 1) without calling `on_multirun_end`; sweep.json is therefore also
rewritten after every job, and is complete once the last job has ended.

Reading a sweep back (scripts/compare_runs.py): `build_report` gathers each run's metrics (CSV
or .wandb), measures its decode cache on the model rebuilt from last.ckpt, loads its spectral
history, and renders the comparison with analysis/compare.py.
"""

import csv
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from analysis.files import atomic_write
from trainer.checkpoint_io import CorruptCheckpointError, load_verified
from trainer.run_dir import RunDirectory

if TYPE_CHECKING:
    from models import GPT

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
FAILED_FILE = "FAILED"
SUMMARY_FILE = "sweep.json"
STATUSES = ("done", "skipped", "failed", "incomplete")
# Hydra flags that take a value as the next argument (kept when a DDP child's command is rebuilt)
_VALUE_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")
# what Lightning's DDP launcher puts in rank 0's environment (LOCAL_RANK would make the next job
# of a multirun believe its ranks are started externally, and wait for them)
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def is_global_zero() -> bool:
    """Whether this process is global rank 0, from the launchers' environment (True when not
    distributed): every rank variable present is 0. Lightning sets LOCAL_RANK (and NODE_RANK) for
    the ranks it starts; torchrun sets RANK; SLURM, and so submitit, sets SLURM_PROCID per task."""
    return all(os.environ.get(var, "0") in ("", "0") for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def single_run_argv(argv: Sequence[str], task_overrides: Sequence[str]) -> list[str]:
    """The command line that runs one job of a multirun on its own.

    Lightning's DDP launcher starts ranks > 0 by re-executing `sys.argv` (plus `hydra.run.dir`);
    in a multirun that is the whole sweep command. This keeps the program and Hydra's config-path
    flags, drops -m/--multirun and the sweep's overrides, and puts in the job's own overrides and
    `hydra.mode=RUN` (a sweep preset may set MULTIRUN).
    """
    out, rest, keep_next = [argv[0]], list(argv[1:]), False
    for arg in rest:
        if keep_next:
            out.append(arg)
            keep_next = False
        elif arg in ("-m", "--multirun"):
            continue
        elif arg.startswith("-"):
            out.append(arg)
            keep_next = arg in _VALUE_FLAGS
    return [*out, *task_overrides, "hydra.mode=RUN"]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: concurrent writers (remote jobs) never leave a half-written file."""
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _finish_wandb(failed: bool) -> None:
    """Close this process's W&B run: Lightning's WandbLogger reuses a run still open, so without
    this every later job of a multirun would log into the first job's run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def _end_distributed(env: dict[str, str | None]) -> None:
    """After a DDP job of a multirun: leave the process group (Lightning keeps it, and the next
    job would reuse it with the old job's ranks gone) and restore the rendezvous variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for var, value in env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


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


def summarize(sweep_dir: str | Path, invocation: float | None) -> dict[str, Any]:
    """sweep.json's content: the jobs under `sweep_dir` whose last attempt belongs to `invocation`."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for job_file in sorted(sweep_dir.glob(f"*/{JOB_FILE}")):
        job = _read_json(job_file)
        if job and (invocation is None or job.get("invocation") == invocation):
            jobs.append(job)
    jobs.sort(key=lambda j: (j.get("num", 0), j.get("dir", "")))
    summary = _read_json(sweep_dir / SUMMARY_FILE)
    return {
        "sweep": summary.get("sweep", sweep_dir.name),
        "dir": str(sweep_dir.resolve()),
        "invocation": invocation,
        "started": summary.get("started"),
        "finished": None,
        "counts": {s: sum(j.get("status") == s for j in jobs) for s in STATUSES},
        "jobs": [{k: j.get(k) for k in ("dir", "overrides", "status", "attempts", "seconds", "error", "objective")}
                 for j in jobs],
    }


class SweepBookkeeping(Callback):
    """DONE/FAILED bookkeeping of Hydra jobs and the sweep summary (see the module docstring).

    Only the global rank-0 process of a job keeps books: DDP ranks Lightning starts itself run
    the Hydra app (and so these callbacks) again, and SLURM starts one process per task.
    """

    def __init__(self) -> None:
        self.invocation: float | None = None
        self._job: dict[str, Any] | None = None
        self._argv: list[str] | None = None
        self._env: dict[str, str | None] = {}

    # ----------------------------------------------------------------- multirun
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        self.invocation = time.time()
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_json(sweep_dir / SUMMARY_FILE, {
            "sweep": str(config.get("experiment_name", sweep_dir.name)), "dir": str(sweep_dir.resolve()),
            "invocation": self.invocation, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
        })

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarize(sweep_dir, self.invocation)
        summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(sweep_dir / SUMMARY_FILE, summary)
        counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
        log.info("sweep %s: %s (%s)", summary["sweep"], counts, sweep_dir / SUMMARY_FILE)

    # ----------------------------------------------------------------- jobs
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        run = RunDirectory(config.hydra.runtime.output_dir)
        previous = _read_json(run.path / JOB_FILE)
        was_done = run.is_done()
        self._job = {"start": time.time(), "was_done": was_done,
                     "done_before": run.done_file.read_text() if was_done else None,  # an extension rewrites it
                     "attempts": previous.get("attempts", 0) + (0 if was_done else 1)}
        failed = run.path / FAILED_FILE
        if failed.exists() and not was_done:
            reason = (failed.read_text(errors="replace").splitlines() or ["no reason recorded"])[0]
            log.info("retrying %s (an earlier attempt failed: %s)", run.path, reason)
            failed.unlink()
        if self._is_multirun(config):  # the jobs share this process: each starts as if alone
            self._argv = list(sys.argv)
            sys.argv = single_run_argv(sys.argv, list(config.hydra.overrides.task))
            self._env = {var: os.environ.get(var) for var in _DDP_ENV}

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        failed = job_return.status == JobStatus.FAILED
        _finish_wandb(failed)
        if self._argv is not None:
            sys.argv, self._argv = self._argv, None
            _end_distributed(self._env)
        run = RunDirectory(config.hydra.runtime.output_dir)
        job = self._job or {"start": time.time(), "was_done": False, "attempts": 1}
        self._job = None
        error = job_return._return_value if failed else None
        if failed:
            status = "failed"
        elif job["was_done"] and run.is_done() and run.done_file.read_text() == job.get("done_before"):
            status = "skipped"  # DONE before and untouched (an extend_to run rewrites DONE: it is "done")
        else:
            status = "done" if run.is_done() else "incomplete"
        value = job_return._return_value if not failed else None
        overrides = list(config.hydra.overrides.task)
        record = {
            "dir": run.path.name, "path": str(run.path), "overrides": overrides,
            "num": int(OmegaConf.select(config, "hydra.job.num", default=0) or 0),
            "status": status, "attempts": job["attempts"],
            "started": job["start"], "ended": time.time(), "seconds": round(time.time() - job["start"], 3),
            "error": f"{type(error).__name__}: {error}" if error is not None else None,
            "objective": float(value) if isinstance(value, (int, float)) else None,
            "invocation": self.invocation,
        }
        run.path.mkdir(parents=True, exist_ok=True)
        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        run.record_config(task, config.hydra)  # a job refused before training has its overrides saved too
        if failed:
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            (run.path / FAILED_FILE).write_text(
                f"{record['error']}\noverrides: {' '.join(overrides)}\nattempt: {job['attempts']}\n"
                f"time: {time.strftime('%Y-%m-%dT%H:%M:%S')}\n\n{tb}"
            )
            log.error("job %s FAILED (%s); rerun the sweep command to retry it", run.path, record["error"])
        _write_json(run.path / JOB_FILE, record)
        if self._is_multirun(config):
            sweep_dir = Path(str(config.hydra.sweep.dir))
            invocation = self.invocation or _read_json(sweep_dir / SUMMARY_FILE).get("invocation")
            if invocation is not None and record["invocation"] is None:
                record["invocation"] = invocation
                _write_json(run.path / JOB_FILE, record)
            _write_json(sweep_dir / SUMMARY_FILE, summarize(sweep_dir, invocation))

    @staticmethod
    def _is_multirun(config: DictConfig) -> bool:
        return OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN


# ----------------------------------------------------------------- reading a sweep back
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


def model_from_checkpoint(path: str | Path) -> "GPT":
    """The GPT a LitGPT checkpoint holds, rebuilt from its hyper_parameters, with its weights.

    The file is verified and loaded with weights_only=True (CorruptCheckpointError otherwise)."""
    from trainer.checkpoints import load_lit_gpt

    return load_lit_gpt(path).model


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Compare a sweep's runs: val loss curves, tokens/s, KV-cache bytes/token/layer measured on
    each run's model, spectral spikes per layer over time. Writes PNGs, index.html and
    compare.json to `out_dir` (default <sweep_dir>/report) and returns compare.json's content."""
    import matplotlib.pyplot as plt

    from analysis import compare
    from analysis.history import CHECK_GLOB, load_history

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
        if any(run.spectra_dir.glob(CHECK_GLOB)):
            hist = load_history(run.spectra_dir)
            v.spikes = (np.array(hist.steps), hist.per_layer("content", "num_spikes", "sum"))
        variants.append(v)

    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "val_loss.png": (compare.loss_figure(variants), "validation loss over optimizer steps"),
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
    } for v in variants], "files": sorted([*figures, "index.html"])}
    _write_json(out / "compare.json", result)
    return result
