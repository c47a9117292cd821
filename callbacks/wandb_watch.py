"""Warn when the W&B run directory disappears while training (W&B's service goes on writing into
the deleted file, so everything it records from then on is lost when the run ends)."""

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


class WandbDirectoryWatch(L.Callback):
    """Every `every_n_steps` optimizer steps, check that each W&B logger's run directory still exists;
    once it is gone, say so (once) and what to do."""

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.wandb_watch.every_n_steps={every_n_steps} is invalid; allowed: >= 1")
        self.every_n_steps = every_n_steps
        self.warned: set[str] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero or trainer.global_step % self.every_n_steps:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):  # started already: trainer.loggers.wandb_logger starts it
                continue
            run_dir = Path(logger.experiment.dir).parent  # <save_dir>/wandb/<offline-run-...>/files -> its run
            if not run_dir.exists() and str(run_dir) not in self.warned:
                self.warned.add(str(run_dir))
                log.warning(
                    "step %d: the W&B run directory %s was deleted while training; W&B keeps writing into the "
                    "deleted file, so its history from this session is lost. Metrics still go to any other "
                    "logger; stop and rerun the command to resume into a new W&B session file "
                    "(the W&B run id is kept in wandb_run_id)", trainer.global_step, run_dir)
