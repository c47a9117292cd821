"""Train a model: `python -m trainer.train [group=option ...] [key=value ...]`.

Compose the config, build every object from its `_target_`, fit, mark the run done.
"""

import logging
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
from trainer.config import validate
from trainer.run_dir import RunDirectory
from trainer.sweep import is_global_zero, objective

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; return the best val/loss (the objective a sweeper such as Optuna minimises)."""
    run = RunDirectory(cfg.paths.run_dir)
    if run.is_done():
        log.info("%s is DONE; nothing to do (delete DONE or use another experiment_name)", run.path)
        return objective(run.path)
    L.seed_everything(cfg.seed, workers=True)
    try:
        validate(cfg)
        ckpt_path = run.resume_checkpoint(cfg.resume)
        datamodule = instantiate(cfg.data)
        if is_global_zero():
            datamodule.prepare_data()  # a bad or too-short corpus fails here, naming the file, before any logger
        module = instantiate(cfg.module)
        callbacks = [c for c in instantiate(cfg.callbacks).values() if c is not None] if cfg.callbacks else []
    except (ConfigError, FileNotFoundError, InstantiationException) as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # fails this job only: Hydra's launcher records it and goes on (SystemExit would end the sweep)
        run.discard_if_unused()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    if not is_global_zero() and cfg.logger and "wandb" in cfg.logger:
        _await_file(run.wandb_id_file)  # SLURM/torchrun start every rank at once: rank 0 alone writes the id
    loggers = list(instantiate(cfg.logger).values()) if cfg.logger else []
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log.info("run directory: %s (resume from %s)", run.path, ckpt_path or "scratch")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.global_step >= trainer.max_steps and not trainer.interrupted:
        trainer.save_checkpoint(run.last_checkpoint)  # every rank takes part (FSDP gathers); rank 0 writes
        if trainer.is_global_zero:
            run.mark_done()
            return objective(run.path)
    else:
        log.warning("stopped at step %d of %d: not DONE; rerun the command to resume", trainer.global_step,
                    trainer.max_steps)
    return None


def _await_file(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
