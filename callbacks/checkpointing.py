"""The resume checkpoint: Lightning's ModelCheckpoint, saved after validation when both fall on one step.

Lightning's ModelCheckpoint saves `every_n_train_steps` at the end of the training batch, before
a validation due at the same step runs. A run resumed from that checkpoint does not repeat the
validation (Lightning fast-forwards past it), so its result never reaches the restored callback
states: the best-checkpoint callback forgets that score, and may later overwrite a better
best.ckpt. `StepCheckpoint` defers such a save to the end of that validation (Lightning's own
deferral path), so the checkpoint holds the validation's results and resuming from it skips
nothing and repeats nothing.
"""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) whose step-triggered save waits for a validation due at that step."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        due = (
            pl_module.automatic_optimization
            and self._every_n_train_steps >= 1
            and trainer.global_step % self._every_n_train_steps == 0
            and not self._should_skip_saving_checkpoint(trainer)
        )
        if due and _validation_follows(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves it
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether the training loop runs validation right after this batch (Lightning's own test, asked early).

    Only the LightningModule's on_train_batch_end hook runs between this callback (checkpoint
    callbacks run last) and the loop's own decision; a time-based val_check_interval is not predicted.
    """
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None or loop._skip_next_val or trainer._val_check_time_interval is not None:
        return False
    return bool(loop._should_check_val_fx(fetcher))
