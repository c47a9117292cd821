"""Experiment loggers: W&B (offline unless asked otherwise) with CSV as the fallback.

Neither may lose or stop a run: W&B that cannot start (import or init failure, a W&B directory
that cannot be written or whose disk is full) is replaced by CSV logging with a warning, and
the CSV log of a resumed run continues the file of the earlier sessions (Lightning's own
CSVLogger deletes it).
"""

import csv
import logging
import os
import shutil
import sys
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from analysis.files import atomic_write
from trainer.run_dir import RunDirectory

log = logging.getLogger(__name__)

PROBE_BYTES = 1 << 16  # written and fsync'ed into the W&B directory before W&B starts
WANDB_FLUSH_SECONDS = 0.1  # W&B's service writes its .wandb file in 32 KiB blocks, otherwise every 15 s


def finish_wandb(exit_code: int) -> None:
    """Close this process's W&B run, if one is open. Lightning's WandbLogger reuses a run still open
    (`wandb.run`), so without this the next run in the same process (a multirun's next job, a notebook,
    an in-process test) would log into this one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def wandb_mode() -> str:
    """'online' only when the user asks (WANDB_MODE=online); otherwise 'offline' (or 'disabled')."""
    mode = os.environ.get("WANDB_MODE", "offline")
    return mode if mode in ("online", "offline", "disabled") else "offline"


def check_writable(directory: Path, min_free_mb: float) -> None:
    """Raise OSError unless `directory` can be created, written and fsync'ed and has `min_free_mb` free.

    The probe is a real write (PROBE_BYTES, fsync'ed), so a read-only or full filesystem fails
    here, before W&B starts, instead of W&B's service failing to write later on its own.
    """
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)
    free_mb = shutil.disk_usage(directory).free / 2**20
    if free_mb < min_free_mb:
        raise OSError(f"{directory} has {free_mb:.1f} MB free, less than logger.wandb.min_free_mb={min_free_mb:g}")


class GrowingTablesWandbLogger(WandbLogger):
    """WandbLogger whose `log_text` adds its rows to one incremental W&B table per key (one table in the
    UI that grows: every validation's text sample under `samples`) instead of a new one-row table each call."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)  # WandbLogger always passes it; W&B warns that it has no effect
        self._tables: dict = {}

    def log_text(self, key: str, columns: list[str] | None = None, data: list[list] | None = None,
                 dataframe=None, step: int | None = None) -> None:
        import wandb

        if key not in self._tables:
            self._tables[key] = wandb.Table(columns=columns, log_mode="INCREMENTAL")
        table = self._tables[key]
        for row in data or []:
            table.add_data(*row)
        self.log_metrics({key: table}, step)


def wandb_logger(run_dir: str, project: str, name: str, group: str | None = None,
                 tags: list[str] | None = None, run_tags: list[str] | None = None,
                 min_free_mb: float = 50.0, log_model: bool | str = False) -> Logger:
    """A WandbLogger whose run id lives in the run directory, so a resumed run continues it.

    If W&B cannot start (import, init or disk failure: `<run_dir>/wandb` unwritable or with less
    than `min_free_mb` free), training goes on with a CSVLogger in the same run directory and a
    warning says why. The W&B tags are `run_tags` (what the run is: variant, size) then the user's `tags`.
    `log_model` is WandbLogger's: True uploads the checkpoints as artifacts when training ends, "all" at
    every save (offline, they are recorded in the run and uploaded by `wandb sync`).
    """
    run = RunDirectory(run_dir)
    try:
        import wandb

        check_writable(run.path / "wandb", min_free_mb)
        run_id = run.wandb_run_id()
        settings = {"mode": wandb_mode(), "console": "off", "x_disable_stats": True}
        if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
            settings["x_transaction_log_flush_interval"] = WANDB_FLUSH_SECONDS  # what a crash can lose
        all_tags = list(dict.fromkeys([*(run_tags or []), *(tags or [])]))  # in order, each once
        logger = GrowingTablesWandbLogger(
            project=project, name=name, group=group, tags=all_tags, id=run_id, resume="allow", log_model=log_model,
            save_dir=str(run.path), settings=wandb.Settings(**settings),
        )  # the mode is in settings: WandbLogger's `offline` flag only sets WANDB_MODE, and refuses log_model
        #   although an offline run records its artifacts for `wandb sync` to upload
        experiment = logger.experiment  # start W&B now, so a failure falls back before training
        for metric in ("val/loss", "val/ppl"):  # the run table and sweep views show the best value
            experiment.define_metric(metric, step_metric="trainer/global_step", step_sync=True, summary="min")
        return logger
    except Exception as e:  # W&B failures must never stop training
        log.warning("W&B could not start (%s: %s); logging to CSV in %s instead", type(e).__name__, e,
                    run.path / "csv")
        return csv_logger(run_dir)


def drop_torn_tail(path: Path) -> None:
    """Cut a text file after its last newline: a crash mid-write (a full disk) leaves a partial last line,
    which the next session's rows would otherwise be glued to."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            log.warning("%s ends in a partial row (%d bytes, a crash mid-write): dropped", path, len(data) - end)
            f.truncate(end)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted (its torn
    last row dropped first), and a header change rewrites the file atomically (temp file + rename)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            drop_torn_tail(path)
            with open(path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        with atomic_write(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resume: each session appends to it (a step repeated
    after a crash appears twice; its later row counts). Built with flush_logs_every_n_steps=1 by
    `csv_logger`, so every row is on disk before the checkpoint that follows it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def csv_logger(run_dir: str) -> Logger:
    """Metrics as CSV under <run_dir>/csv/ (continued across resumes)."""
    return ResumableCSVLogger(save_dir=str(Path(run_dir)), name="csv", version="", flush_logs_every_n_steps=1)
