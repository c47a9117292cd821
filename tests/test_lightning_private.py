"""The Lightning internals qkscope relies on, where no public hook serves, listed in one place: if an
upgrade renames one, this test names it (instead of a callback failing mid-run, or silently doing nothing).

- callbacks/checkpointing.py  defers a step checkpoint to the validation at the same step
- callbacks/throughput.py     continues ThroughputMonitor's totals after a resume
- trainer/loggers.py          continues csv/metrics.csv instead of deleting it; drops WandbLogger's `anonymous`
- callbacks/progress.py       names the training bar (not "Epoch 0/-2") and logs through the bar's console
"""

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


@pytest.fixture(scope="module")
def trainer() -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, max_steps=1, enable_progress_bar=False,
                     enable_model_summary=False)


def missing(obj: object, names: tuple[str, ...]) -> list[str]:
    return [f"{type(obj).__name__ if not isinstance(obj, type) else obj.__name__}.{n}" for n in names
            if not hasattr(obj, n)]


def test_the_private_lightning_names_qkscope_uses_exist(trainer: L.Trainer, tmp_path) -> None:
    gone = [
        *missing(trainer, ("_val_check_time_interval",)),
        *missing(trainer.fit_loop, ("_data_fetcher",)),
        *missing(trainer.fit_loop.epoch_loop, ("_skip_next_val", "_should_check_val_fx")),
        *missing(ModelCheckpoint(), ("_defer_save_until_validation", "_every_n_train_steps",
                                     "_should_skip_saving_checkpoint")),
        *missing(ThroughputMonitor(batch_size_fn=len), ("_batches", "_samples", "_lengths")),
        *missing(ExperimentWriter, ("_check_log_dir_exists", "_rewrite_with_new_header")),
        *missing(CSVLogger(str(tmp_path)), ("_experiment", "_fs")),
        *missing(RichProgressBar(), ("_get_train_description", "_console")),
        *missing(WandbLogger(save_dir=str(tmp_path)), ("_wandb_init",)),
    ]
    assert gone == [], f"Lightning {L.__version__} no longer has {gone}: update the modules listed above"
