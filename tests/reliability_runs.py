"""Shared by the reliability tests: the tiny run they crash and compare, and how they compare runs.

`train_forked` runs the real entry point in a forked child (tests/reliability_hooks.py); the
comparisons read the run directory's real files (CSV, alerts.jsonl, spectra/, checkpoints).
"""

import csv
import json
import os
from pathlib import Path

import torch

from tests.conftest import wandb_files
from tests.reliability_hooks import KILL_ENV, ChildRun, fill_disk, run_forked
from trainer.wandb_records import history

MAX_STEPS = 16
TINY = (  # a 2-layer d=64 model on 4 x 32-token batches: ~0.1 s per step on one CPU thread
    "trainer=debug", f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=8", "trainer.deterministic=true",
    "+trainer.enable_progress_bar=false", "callbacks.progress=null", "data.val_batches=2", "data.batch_size=4",
    "data.block_size=32", "model.n_layer=2", "model.d_model=64", "optim.warmup_steps=4", "module.sample_tokens=0",
    "callbacks.last_checkpoint.every_n_train_steps=4", "spectral.every_n_steps=4", "spectral.mc_draws=200",
    "spectral.rules.spikes.k=1", "spectral.rules.spikes.K=1",
    "+callbacks.spike._target_=tests.reliability_hooks.PlantSpikeAt", "+callbacks.spike.step=6",  # alert at step 8
    "+callbacks.kill._target_=tests.reliability_hooks.KillAt",  # inert unless QKSCOPE_KILL_AT is set
)
# Metrics that measure the machine, not the training: wall-clock times, rates, validation throughput.
# ThroughputMonitor's training totals (train/batches, train/samples, train/lengths) are state: a
# resumed run continues them, so they are compared like the loss.
NOT_STATE = ("time", "seconds", "per_sec", "validate/")


def run_dir_of(root: Path) -> Path:
    (path,) = (root / "default").iterdir()
    return path


def train_forked(root: Path, cache: Path, *extra: str, kill: str | None = None, **kwargs: object) -> ChildRun:
    args = [*TINY, *extra, f"paths.root={root}", f"paths.cache_dir={cache}"]
    return run_forked(args, env={KILL_ENV: kill} if kill else None, **kwargs)


def csv_state(run_dir: Path) -> dict[tuple[int, str], str]:
    """(step, metric) -> value from csv/metrics.csv, the later row winning where a resumed run repeated a step."""
    out = {}
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value != "" and key != "step" and not any(s in key for s in NOT_STATE):
                    out[int(row["step"]), key] = value
    return out


def wandb_state(run_dir: Path) -> dict[tuple[int, str], object]:
    """(trainer/global_step, metric) -> value over every W&B session of a run, the later one winning."""
    out = {}
    for f in wandb_files(run_dir):
        for row in history(f):
            step = row.get("trainer/global_step")
            for key, value in row.items():
                if step is not None and not key.startswith("_") and not any(s in key for s in NOT_STATE):
                    out[int(step), key] = value
    return out


def alert_records(run_dir: Path) -> list[dict]:
    path = run_dir / "alerts.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def max_state_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two checkpoints' weights, optimizer moments and LR state."""
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert ca["global_step"] == cb["global_step"]
    assert ca["lr_schedulers"] == cb["lr_schedulers"]  # LambdaLR: last_epoch, base_lrs, _last_lr
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    diffs = [float((ca["state_dict"][k] - cb["state_dict"][k]).abs().max()) for k in ca["state_dict"]]
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            diffs.append(float((sa[i][name] - sb[i][name]).abs().max()))
    return max(diffs)


def assert_same_run(reference: Path, resumed: Path, tolerance: float = 1e-6) -> float:
    """The resumed run's records and final state equal the uninterrupted run's; returns the max difference."""
    ref_csv, got_csv = csv_state(reference), csv_state(resumed)
    assert ref_csv.keys() == got_csv.keys()
    losses = [(k, float(v), float(got_csv[k])) for k, v in ref_csv.items() if k[1] in ("train/loss", "val/loss")]
    assert len(losses) >= MAX_STEPS
    curve_diff = max(abs(a - b) for _, a, b in losses)
    assert curve_diff <= tolerance, [x for x in losses if abs(x[1] - x[2]) > tolerance][:5]
    others = [k for k in ref_csv if "loss" not in k[1]]  # LR, spectral metrics, val/ppl, epoch: exactly equal
    assert [ref_csv[k] for k in others] == [got_csv[k] for k in others]
    assert alert_records(reference) == alert_records(resumed)  # every alert once, none re-fired
    assert sorted(p.name for p in (reference / "spectra").glob("*.npz")) == sorted(
        p.name for p in (resumed / "spectra").glob("*.npz"))
    state_diff = max(max_state_difference(reference / "checkpoints" / name, resumed / "checkpoints" / name)
                     for name in ("last.ckpt", "best.ckpt"))
    assert state_diff <= tolerance
    assert (resumed / "DONE").exists()
    return max(curve_diff, state_diff)


def mount_tmpfs(target: Path, options: str, fill: bool) -> None:
    """In the child: a private mount namespace with a small tmpfs over `target` (a real full or read-only disk)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 1 << 18
    target.mkdir(parents=True, exist_ok=True)
    if (libc.unshare(clone_newns) != 0 or libc.mount(b"none", b"/", None, ms_rec | ms_private, None) != 0
            or libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0, b"size=256k") != 0):
        print("SKIP: cannot mount a tmpfs here:", os.strerror(ctypes.get_errno()))
        os._exit(77)
    if fill:
        fill_disk(target / "filler")
    if "ro" in options.split(","):
        libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0x20 | 1, None)  # MS_REMOUNT | MS_RDONLY


