"""Train a model: `python -m trainer.train [group=option ...] [key=value ...]`.

Compose the config, check it, take the run directory, build every object from its `_target_`,
fit, mark the run done. Exit status of a single run:

    0  trained to trainer.max_steps (DONE), or DONE already: nothing to do
    1  failed: an exception (traceback), or torch.compile could not compile the model (one error line)
    2  refused before any work: a bad value (named with what is allowed), a run directory in use
       by another process, or a command that does not fit the run's plan (run.json)
    3  stopped early, not DONE: divergence or an alert's `stop` action (the reason is printed)
    4  the disk of the run directory filled up or became read-only; the last checkpoint is
       intact and rerunning the command resumes from it

In a multirun a job that is refused or fails raises instead (Hydra records it and goes on).
"""

import errno
import logging
import shutil
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from models.config import ConfigError
from trainer.checkpoint_io import CorruptCheckpointError, verify_checkpoint
from trainer.config import validate
from trainer.console import quiet_known_noise
from trainer.distributed import is_global_zero
from trainer.lit_gpt import CompileError
from trainer.loggers import finish_wandb
from trainer.run_checks import schedule_warning
from trainer.run_dir import RunDirectory, RunDirectoryError
from trainer.run_results import objective

log = logging.getLogger(__name__)

REFUSED = (ConfigError, RunDirectoryError, FileNotFoundError, InstantiationException)
EXIT_REFUSED, EXIT_STOPPED, EXIT_DISK = 2, 3, 4
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


class RunEndedError(Exception):
    """A single run ended before or instead of training to its plan; `exit_code` is its exit status."""

    exit_code = 1


class RunRefusedError(RunEndedError):
    """Refused before any work: a bad value, a run directory in use, a command that does not fit the plan."""

    exit_code = EXIT_REFUSED


class RunStoppedError(RunEndedError):
    """Stopped early, not DONE: divergence or an alert's `stop` action."""

    exit_code = EXIT_STOPPED


class DiskFailureError(RunEndedError):
    """The disk of the run directory filled up or became read-only mid-run."""

    exit_code = EXIT_DISK


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The command line: train, print why a run ended early as one `error:` line, exit with its status.
    In a multirun a refused or failed job raises instead (Hydra records it and goes on)."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train(cfg, HydraConfig.get(), multirun=multirun)
    except RunEndedError as e:
        if multirun and isinstance(e, RunStoppedError):
            log.error("%s", e)
            return None
        if multirun:
            raise e.__cause__ or e from None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def train(cfg: DictConfig, hydra_cfg: DictConfig, multirun: bool = False) -> float | None:
    """Check `cfg`, take its run directory, build every object from its `_target_`, fit, mark the run DONE;
    return the best val/loss (the objective a sweeper minimises), or None on ranks > 0.

    hydra_cfg: the `hydra` node the run was composed with (recorded in .hydra/). Raises RunRefusedError,
    RunStoppedError or DiskFailureError (the module docstring's statuses 2, 3, 4). Tests call this in-process.
    """
    quiet_known_noise()
    run = RunDirectory(cfg.paths.run_dir)
    exit_code = 1
    try:
        result = _train(cfg, hydra_cfg, run, multirun)
        exit_code = 0
        return result
    except RunEndedError as e:
        exit_code = e.exit_code
        raise
    finally:
        finish_wandb(exit_code)  # however the run ended: a later run in this process starts its own
        run.unlock()


def _train(cfg: DictConfig, hydra_cfg: DictConfig, run: RunDirectory, multirun: bool) -> float | None:
    try:
        validate(cfg)
        if is_global_zero():
            run.lock()
            if cfg.resume == "never" and (aside := run.move_aside()) is not None:
                log.warning("resume=never: the earlier contents of %s are now in %s", run.path, aside)
        planned = run.planned_steps()
        max_steps = run.plan(cfg.trainer.max_steps, cfg.extend_to)
        if run.is_done() and max_steps == (planned or max_steps):
            log.info("%s is DONE at step %d; nothing to do (extend_to=N continues it to N steps)", run.path,
                     max_steps)
            return objective(run.path)
        if (warning := schedule_warning(cfg, max_steps)) is not None:
            log.warning("%s", warning)
        ckpt_path = run.resume_checkpoint(cfg.resume)
        if run.resume_step > max_steps:
            raise RunDirectoryError(f"{ckpt_path} is at step {run.resume_step}, past trainer.max_steps={max_steps}")
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        module = instantiate(cfg.module)
        callbacks = [c for c in instantiate(cfg.callbacks).values() if c is not None] if cfg.callbacks else []
        if is_global_zero():
            datamodule.prepare_data()  # a bad or too-short corpus fails here, naming the file, before any logger
    except REFUSED as e:
        if not multirun:
            run.discard_if_unused()
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        raise RunRefusedError(str(cause)) from e  # a component's own check names its key

    if is_global_zero():
        run.record_config(cfg, hydra_cfg)
        run.record_plan(max_steps, run.resume_step)
        if planned is not None and max_steps != planned:
            run.unmark_done()
            log.warning("extending %s from step %d (planned: %d) to %d steps: from here the learning rate "
                        "follows the warmup + cosine schedule of a %d-step run", run.path, run.resume_step,
                        planned, max_steps, max_steps)
    if not is_global_zero() and cfg.logger and "wandb" in cfg.logger:
        _await_file(run.wandb_id_file)  # SLURM/torchrun start every rank at once: rank 0 alone writes the id
    loggers = list(instantiate(cfg.logger).values()) if cfg.logger else []
    trainer = instantiate(cfg.trainer, max_steps=max_steps, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log.info("run directory: %s (resume from %s)", run.path, ckpt_path or "scratch")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if trainer.global_step >= max_steps and not _saved_at(trainer, run.last_checkpoint):
            # the full state (optimizer too); every rank takes part (FSDP gathers), rank 0 writes
            trainer.save_checkpoint(run.last_checkpoint, weights_only=False)
    except CompileError as e:
        raise RunEndedError(f"{e}. The run is not DONE; its last checkpoint (if any) resumes eager or compiled") from e
    except (OSError, RuntimeError) as e:
        if not _disk_failure(e):
            raise
        raise DiskFailureError(_disk_message(run.path, e)) from e
    if trainer.global_step >= max_steps:
        if not trainer.is_global_zero:
            return None
        run.mark_done(trainer.global_step)
        return objective(run.path)
    reason = next((c.stop_reason for c in callbacks if getattr(c, "stop_reason", None)), "training stopped early")
    raise RunStoppedError(f"stopped at step {trainer.global_step} of {max_steps}: {reason}. The run is not DONE; "
                     "rerunning the command resumes it from its last checkpoint")


def _saved_at(trainer: L.Trainer, path: Path) -> bool:
    """Whether `path` already holds this final step, saved inside the training loop (StepCheckpoint): the
    better resume point for an extension, since a checkpoint saved after `fit` returned carries the
    finished loop's counters (the logged step of an extended run would be one ahead)."""
    at = None
    if trainer.is_global_zero:
        try:
            at = verify_checkpoint(path)["global_step"] == trainer.global_step
        except CorruptCheckpointError:
            at = False
    return bool(trainer.strategy.broadcast(at, src=0))


def _disk_failure(e: BaseException) -> bool:
    """Whether `e` (or an exception it was raised from) is a full, over-quota or read-only filesystem."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return True
        if isinstance(e, RuntimeError) and "file write failed" in str(e):  # torch.save's zip writer
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_message(path: Path, e: BaseException) -> str:
    free = shutil.disk_usage(path).free / 2**20 if path.exists() else float("nan")
    return (f"writing to {path} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
            f"{free:.1f} MB free on its filesystem. Checkpoints are written atomically, so the last one is intact: "
            "free space (or make the filesystem writable) and rerun the same command to resume")


def _await_file(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
