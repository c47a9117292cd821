"""The console during training: Lightning's Rich progress bar showing what a researcher watches (loss,
validation loss, learning rate, gradient norm, tokens/s and MFU where the device's peak is known) on
one line, with log records printed above the bar instead of through it."""

import logging
import sys
import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, ThroughputMonitor
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
from rich.logging import RichHandler
from rich.progress import BarColumn

BAR_WIDTH = 20  # characters of the bar itself (Rich's default is 40)


def bar_metrics(metrics: dict[str, Any], lr: float | None, tokens_per_sec: float | None,
                mfu: float | None) -> dict[str, str]:
    """The progress line's fields, short names and formatted: loss, val, lr, gnorm, tok/s, mfu."""
    out = {}
    for key, name, fmt in (("train/loss", "loss", ".3f"), ("val/loss", "val", ".3f"),
                           ("train/grad_norm", "gnorm", ".2f")):
        if key in metrics:
            out[name] = f"{float(metrics[key]):{fmt}}"
    if lr is not None:
        out["lr"] = f"{lr:.2e}"
    if tokens_per_sec is not None:
        out["tok/s"] = f"{tokens_per_sec / 1e3:.1f}k" if tokens_per_sec >= 1e3 else f"{tokens_per_sec:.0f}"
    if mfu is not None:
        out["mfu"] = f"{100 * mfu:.1f}%"
    return out


class TrainingProgressBar(RichProgressBar):
    """RichProgressBar with a training line `step • loss • val • lr • gnorm • tok/s • mfu` (no epoch, no
    v_num, no it/s) and, on a terminal, the console's logging handlers replaced by a RichHandler on the
    bar's own console, so log records appear above the live bar (the file log is untouched).

    tok/s is the training tokens (all ranks) per second over the last `window` batches; MFU is
    flops_per_batch (the module's attribute: one device's batch) x batches/s over the peak FLOP/s of one
    device that Lightning's ThroughputMonitor found (none on CPU, so no MFU there).
    """

    def __init__(self, leave: bool = True, window: int = 20, **kwargs: Any) -> None:
        super().__init__(leave=leave, **kwargs)
        self._ends: deque[tuple[float, int]] = deque(maxlen=window + 1)  # (time, tokens) at batch ends
        self._swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []
        self._streams: tuple = ()

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = [c for c in super().configure_columns(trainer) if not isinstance(c, ProcessingSpeedColumn)]
        for column in columns:
            if isinstance(column, BarColumn):
                column.bar_width = BAR_WIDTH  # room for the metrics on one line of a 120-column terminal
        return columns

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"  # the stream is endless: epochs mean nothing

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)  # before a live bar redirects them

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._console is not None and self._console.is_terminal:
            self._log_through_console(self._streams)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._ends.append((time.perf_counter(), int(batch[0].numel()) * trainer.world_size))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = dict(trainer.callback_metrics)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        rate = mfu = None
        if len(self._ends) >= 2:
            (t0, _), (t1, _) = self._ends[0], self._ends[-1]
            if t1 > t0:
                batches = len(self._ends) - 1
                rate = sum(tokens for _, tokens in list(self._ends)[1:]) / (t1 - t0)
                peak = next((c.available_flops for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
                flops = getattr(pl_module, "flops_per_batch", None)
                if peak and flops:
                    mfu = flops * batches / (t1 - t0) / peak  # per device: every rank runs the same batches
        return bar_metrics(metrics, lr, rate, mfu)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restore_logging()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_logging()

    def _log_through_console(self, streams: tuple) -> None:
        """Swap every stdout/stderr StreamHandler (Hydra's console handler holds the original stream,
        which Rich's live display cannot redirect) for a RichHandler on the bar's console."""
        for logger in (logging.getLogger(), *[logging.getLogger(n) for n in logging.root.manager.loggerDict]):
            for handler in list(getattr(logger, "handlers", [])):
                if type(handler) is logging.StreamHandler and handler.stream in streams:
                    rich = RichHandler(console=self._console, level=handler.level, show_path=False,
                                       markup=False, rich_tracebacks=False, log_time_format="[%X]")
                    rich.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
                    for f in handler.filters:
                        rich.addFilter(f)
                    logger.removeHandler(handler)
                    logger.addHandler(rich)
                    self._swapped.append((logger, handler, rich))

    def _restore_logging(self) -> None:
        for logger, original, rich in reversed(self._swapped):
            logger.removeHandler(rich)
            logger.addHandler(original)
        self._swapped.clear()
