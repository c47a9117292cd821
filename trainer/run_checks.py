"""Checks of what the schema's types cannot say (the Trainer's values, the run's), run before any work.

The schema (trainer/config.py) types `trainer.*` and leaves the node open to any other Trainer
argument; the names Trainer does not take and the values Lightning would reject only after the
model, the data and W&B were set up are refused here, each naming the key and what is allowed.
`Preflight` runs every check as a Hydra callback before Hydra creates the run directory, so a
refused single run leaves nothing on disk.
"""

import difflib
import inspect
import math
import re
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.experimental.callback import Callback
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from omegaconf import DictConfig, OmegaConf

from models.config import ConfigError

SEED_RANGE = (0, 2**32 - 1)  # numpy's seed range, which Lightning's seed_everything uses
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=+-]*")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = tuple(str(v) for group in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(group))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def check_trainer(trainer: DictConfig) -> None:
    """Raise ConfigError for a `trainer.*` key lightning.Trainer does not take or a value it would reject."""
    allowed = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        if key != "_target_" and key not in allowed:
            raise ConfigError(f"trainer.{key} is not a lightning.Trainer argument{_did_you_mean(key, allowed)}")
    get = trainer.get
    steps = get("max_steps")
    if not _is_int(steps) or steps < 1:
        raise ConfigError(f"trainer.max_steps={steps} is invalid; allowed: an integer >= 1 (runs are step-based)")
    if str(get("precision", "32-true")) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={get('precision')} is invalid; allowed: {list(PRECISIONS)}")
    accelerator = str(get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator} is invalid; allowed: {list(ACCELERATORS)}")
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda", "mps") and not gpu:
        raise ConfigError(f"trainer.accelerator={accelerator}, but this machine has no GPU; allowed here: cpu, auto "
                          "(trainer=cpu or trainer=default)")
    devices = get("devices", "auto")
    if not (devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1))
            or (isinstance(devices, str) and re.fullmatch(r"\d+(,\d+)*,?", devices))
            or (OmegaConf.is_list(devices) and len(devices) > 0 and all(_is_int(d) and d >= 0 for d in devices))):
        raise ConfigError(f"trainer.devices={devices} is invalid; allowed: an integer >= 1, -1 (all), 'auto', "
                          "or a list of device indices")
    for key in ("num_nodes", "accumulate_grad_batches", "log_every_n_steps"):
        value = get(key, 1)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"trainer.{key}={value} is invalid; allowed: an integer >= 1")
    interval = get("val_check_interval", 1.0)
    if not (interval is None or (_is_int(interval) and interval >= 1)
            or (isinstance(interval, float) and 0.0 < interval <= 1.0)):
        raise ConfigError(f"trainer.val_check_interval={interval} is invalid; allowed: an integer >= 1 (batches) "
                          "or a fraction in (0, 1]")
    clip = get("gradient_clip_val")
    if clip is not None and (not _is_number(clip) or clip < 0):
        raise ConfigError(f"trainer.gradient_clip_val={clip} is invalid; allowed: null or a finite number >= 0")
    limit = get("limit_val_batches")
    if limit is not None and (not _is_number(limit) or limit < 0):
        raise ConfigError(f"trainer.limit_val_batches={limit} is invalid; allowed: null or a number >= 0")


def _writable(key: str, path: Path) -> None:
    """Raise ConfigError unless `path`, or the nearest of its parents that exists, is a directory a file can be
    created in (a real write, so a read-only mount fails even for root)."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={path} is not writable ({probe}: {e.strerror})") from e


def check_run(cfg: DictConfig, known: list[str]) -> None:
    """Raise ConfigError for an unknown top-level key, a seed numpy refuses, an experiment_name that is not a
    plain directory name, or a paths.root / paths.cache_dir that cannot be written."""
    for key in cfg:
        if key not in known:
            raise ConfigError(f"{key} is not a key of the training config{_did_you_mean(str(key), known)}; "
                              f"allowed: {sorted(known)}")
    seed = cfg.get("seed")
    if not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"seed={seed} is invalid; allowed: an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    name = str(cfg.get("experiment_name"))
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ConfigError(f"experiment_name={name} is invalid; allowed: letters, digits and _.,=+- (it names one "
                          "directory under paths.root)")
    extend_to = cfg.get("extend_to")
    if extend_to is not None and (not _is_int(extend_to) or extend_to < 1):
        raise ConfigError(f"extend_to={extend_to} is invalid; allowed: null or an integer >= 1")
    _writable("paths.root", Path(str(cfg.paths.root)))
    _writable("paths.cache_dir", Path(str(cfg.paths.cache_dir)))


def schedule_warning(cfg: DictConfig, max_steps: int) -> str | None:
    """A warning when a run of `max_steps` ends inside its learning-rate warmup: it never trains at
    optim.lr and its cosine decay never starts."""
    warmup = int(cfg.optim.warmup_steps)
    if max_steps > warmup:
        return None
    return (f"trainer.max_steps={max_steps} <= optim.warmup_steps={warmup}: the run ends inside its warmup, "
            f"at {max_steps / max(warmup, 1):.0%} of optim.lr={cfg.optim.lr:g}; lower optim.warmup_steps to train "
            "at the full rate")


class Preflight(Callback):
    """Hydra callback: the checks of `trainer.config.validate` on a single run's config, before Hydra creates
    the run directory; a refused config prints `error: ...` and exits with status 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from trainer.config import validate

        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            validate(task)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)


class CheckpointPreflight(Callback):
    """Hydra callback of the surgery tools: `ckpt=` given and a file, before Hydra resolves the output directory
    (which is derived from it); otherwise one `error:` line with the command's shape, exit status 2."""

    def __init__(self, tool: str) -> None:
        self.tool = tool

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        usage = f"python -m trainer.{self.tool} ckpt=<run_dir>/checkpoints/last.ckpt (--help lists the keys)"
        if OmegaConf.is_missing(config, "ckpt"):
            print(f"error: ckpt= is required, the qkscope training checkpoint to work on: {usage}", file=sys.stderr)
            sys.exit(2)
        if not Path(str(config.ckpt)).is_file():
            print(f"error: ckpt={config.ckpt} is not a file: {usage}", file=sys.stderr)
            sys.exit(2)
