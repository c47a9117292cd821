"""Token throughput (and MFU when the device's peak FLOP/s is known) for (x, y) token batches."""

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

COUNTERS = ("batches", "samples", "lengths")  # ThroughputMonitor's running totals, per stage


def _batch_size(batch: Any) -> int:
    return batch[0].size(0)


def _tokens_in_batch(batch: Any) -> int:
    return batch[0].numel()  # Throughput sums `lengths` as the items of a batch: B x T tokens


class ResumableThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor whose training totals (train/batches, train/samples and
    train/lengths = tokens seen) continue across a resume instead of restarting at 0: they are
    saved in the checkpoint and added back when training starts. Rates and train/time are per session.

    Lightning keeps the totals in private dicts (`_batches`, `_samples`, `_lengths`); this class
    reads and offsets them, and is the one place to change if Lightning renames them.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._restored = dict.fromkeys(COUNTERS, 0)

    def state_dict(self) -> dict[str, int]:
        stage = RunningStage.TRAINING
        return {name: int(getattr(self, f"_{name}").get(stage, 0)) for name in COUNTERS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {name: int(state_dict.get(name, 0)) for name in COUNTERS}

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        stage = RunningStage.TRAINING
        for name, value in self._restored.items():
            counts = getattr(self, f"_{name}")
            if stage in counts:
                counts[stage] += value


def token_throughput_monitor(window_size: int = 20) -> ResumableThroughputMonitor:
    """ThroughputMonitor counting tokens as items (items_per_sec = tokens/s), its totals continued on resume."""
    return ResumableThroughputMonitor(batch_size_fn=_batch_size, length_fn=_tokens_in_batch, window_size=window_size)
