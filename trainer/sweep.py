"""Resumable sweeps: the Hydra callback that keeps a multirun's books.

A sweep is a Hydra multirun (`python -m trainer.train +sweep=attention_variants`, conf/sweep/).
Each job's directory is a pure function of its overrides (conf/hydra/default.yaml), so rerunning
the same command finds the same directories, and train.py skips a job marked DONE and resumes
the others from checkpoints/last.ckpt with their own W&B run ids. Hydra has no sweep resume of
its own (hydra issue #3328); `SweepBookkeeping`, listed under `hydra.callbacks`, adds the rest:

    on_job_start     an earlier attempt's FAILED is removed: the job is being retried
    on_job_end       FAILED (error and traceback) if the job raised; <job>/job.json, this
                     attempt's outcome; <sweep>/sweep.json refreshed (each job's W&B run is
                     closed by `train` itself, so the next job run by this process starts its own)
    on_multirun_end  <sweep>/sweep.json: every job of this invocation, done | skipped | failed |
                     incomplete, with counts

Hydra 1.3's BasicLauncher runs every job of a batch even when one raises (the BasicSweeper's
default max_batch_size=null makes the whole grid one batch), then the sweeper re-raises the
first failure (exit status 1) without calling `on_multirun_end`; sweep.json is therefore also
rewritten after every job, and is complete once the last job has ended.

Reading a sweep back is trainer/run_results.py.
"""

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from analysis.files import write_json  # atomic: concurrent writers (remote jobs) never leave a half-written file
from trainer.distributed import DDP_ENV, end_distributed, is_global_zero, single_run_argv
from trainer.run_dir import RunDirectory
from trainer.run_results import FAILED_FILE

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
SUMMARY_FILE = "sweep.json"
STATUSES = ("done", "skipped", "failed", "incomplete")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


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
        write_json(sweep_dir / SUMMARY_FILE, {
            "sweep": str(config.get("experiment_name", sweep_dir.name)), "dir": str(sweep_dir.resolve()),
            "invocation": self.invocation, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
        })

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarize(sweep_dir, self.invocation)
        summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(sweep_dir / SUMMARY_FILE, summary)
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
            self._env = {var: os.environ.get(var) for var in DDP_ENV}

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not is_global_zero():
            return
        failed = job_return.status == JobStatus.FAILED
        if self._argv is not None:
            sys.argv, self._argv = self._argv, None
            end_distributed(self._env)
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
        write_json(run.path / JOB_FILE, record)
        if self._is_multirun(config):
            sweep_dir = Path(str(config.hydra.sweep.dir))
            invocation = self.invocation or _read_json(sweep_dir / SUMMARY_FILE).get("invocation")
            if invocation is not None and record["invocation"] is None:
                record["invocation"] = invocation
                write_json(run.path / JOB_FILE, record)
            write_json(sweep_dir / SUMMARY_FILE, summarize(sweep_dir, invocation))

    @staticmethod
    def _is_multirun(config: DictConfig) -> bool:
        return OmegaConf.select(config, "hydra.mode", default=None) == RunMode.MULTIRUN
