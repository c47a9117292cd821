"""What the console shows during training: the progress line, log records above the bar, no known noise."""

import io
import logging
import re
import sys
from pathlib import Path

import lightning as L
import rich
from hydra.utils import instantiate

from callbacks.progress import TrainingProgressBar, bar_metrics
from callbacks.throughput import token_throughput_monitor
from tests.conftest import compose_train, run_train_process

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


class LogsAtStep(L.Callback):
    """Logs one record mid-training through a logger with a plain stderr StreamHandler (as Hydra's is)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            self.logger.warning("record-from-step-3")


def test_progress_line_shows_the_run_and_log_records_print_above_the_bar(tmp_path: Path, corpus_cache: Path) -> None:
    cfg = compose_train(["trainer=debug", "logger=csv", "spectral=off", f"paths.cache_dir={corpus_cache}"],
                        tmp_path / "run")
    screen = io.StringIO()
    logger = logging.getLogger("tests.console")
    plain = logging.StreamHandler(sys.stderr)
    logger.addHandler(plain)
    logger.propagate = False
    bar = TrainingProgressBar(console_kwargs={"force_terminal": True, "width": 160, "file": screen})
    try:
        trainer = L.Trainer(max_steps=6, val_check_interval=3, limit_val_batches=2, logger=False,
                            enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
                            callbacks=[bar, token_throughput_monitor(window_size=2), LogsAtStep(logger)])
        trainer.fit(instantiate(cfg.module), datamodule=instantiate(cfg.data))
    finally:
        logger.removeHandler(plain)
        rich.reconfigure()  # the global console back to the real terminal
    assert logger.handlers == [], "the plain handler was not put back after fit"
    text = ANSI.sub("", screen.getvalue()).replace("\r", "\n")
    lines = [line for line in text.split("\n") if line.strip()]
    record = [line for line in lines if "record-from-step-3" in line]
    assert record and all("━" not in line and "loss:" not in line for line in record)  # its own line, above the bar
    final = [line for line in lines if line.startswith("train") and "6/6" in line][-1]
    assert re.search(r"loss: \d+\.\d{3} .*val: \d+\.\d{3}", final) and "gnorm: " in final and "lr: " in final
    assert re.search(r"tok/s: [\d.]+k?", final) and "mfu" not in final  # no peak FLOP/s known for a CPU
    assert "Epoch" not in text and "v_num" not in text and "it/s" not in text


def test_mfu_is_tokens_flops_over_the_devices_peak() -> None:
    monitor = token_throughput_monitor()
    bar = TrainingProgressBar()
    trainer = L.Trainer(callbacks=[bar, monitor], logger=False, enable_checkpointing=False)
    monitor.available_flops = 10**12  # what ThroughputMonitor.setup finds for a known GPU
    module = L.LightningModule()
    module.flops_per_batch = 2 * 10**11  # 0.2 s of the peak per batch
    bar._ends.extend([(0.0, 4096), (1.0, 4096), (2.0, 4096)])  # two batches in 2 s
    assert bar.get_metrics(trainer, module) == {"tok/s": "4.1k", "mfu": "20.0%"}
    assert bar_metrics({"train/loss": 3.14159, "train/grad_norm": 0.5}, 3e-3, 950.0, None) == {
        "loss": "3.142", "gnorm": "0.50", "lr": "3.00e-03", "tok/s": "950"}


def test_a_real_run_prints_no_known_noise_and_counts_its_flops(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train_process("trainer.max_steps=2", "trainer.val_check_interval=2", "spectral=off",
                             f"paths.root={tmp_path}", f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    for noise in ("LeafSpec", "litlogger", "anonymous setting", "limit_val_batches=1.0", "Epoch 0/-2"):
        assert noise not in out, noise
    flops = re.search(r"Total FLOPs: ([\d.]+) ([KMGT]?)", out)
    assert flops and float(flops.group(1)) > 0 and flops.group(2) == "M"  # one 128-token forward of tiny: ~285 M
