"""Checkpoints for the post-training tools: load one, save an edited copy, rebuild its data,
write result tables.

A training checkpoint lives at `<run_dir>/checkpoints/<name>.ckpt`, and `<run_dir>/.hydra/
config.yaml` holds the composed config of the run that wrote it, so the tools can rebuild the
exact tokenizer and validation split (same corpus, vocabulary, cache directory).

`save_edited` copies the source checkpoint dict and swaps in the edited `state_dict`, so the
result loads like any other: `LitGPT.load_from_checkpoint`, `trainer.fit(ckpt_path=...)`
(optimizer, loops and callback states are the source's) and `module.model.generate()`.
"""

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from analysis.files import atomic_write, write_json
from trainer.checkpoint_io import load_verified
from trainer.data import TextDataModule
from trainer.lit_gpt import LitGPT

log = logging.getLogger(__name__)


def _checkpoint_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ckpt={p} does not exist (expected <run_dir>/checkpoints/last.ckpt)")
    return p


def load_lit_gpt(path: str | Path) -> LitGPT:
    """The LitGPT of a Lightning checkpoint, on CPU, in eval mode: the file is verified and loaded
    with weights_only=True (`load_verified`), the module rebuilt from its hyper_parameters."""
    ckpt = load_verified(_checkpoint_file(path), mmap=False)
    module = LitGPT(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def save_edited(module: LitGPT, source_ckpt: str | Path, out_path: str | Path, note: dict | None = None) -> Path:
    """Write `module`'s weights into a copy of `source_ckpt` at out_path (atomically: analysis.files.atomic_write).

    `note` (JSON-like) is stored under the top-level key "qkscope_edit"; Lightning ignores it.
    """
    ckpt = load_verified(_checkpoint_file(source_ckpt), mmap=False)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    missing = set(ckpt["state_dict"]) ^ set(state)
    if missing:
        raise ValueError(f"edited module and {source_ckpt} disagree on parameter names: {sorted(missing)[:5]}")
    ckpt["state_dict"] = state
    if note is not None:
        ckpt["qkscope_edit"] = note
    out = Path(out_path)
    with atomic_write(out, "wb") as f:
        torch.save(ckpt, f)
    return out


def run_dir_of(ckpt: str | Path) -> Path:
    """The run directory of `<run_dir>/checkpoints/<name>.ckpt`."""
    return Path(ckpt).resolve().parent.parent


def run_config(ckpt: str | Path) -> DictConfig:
    """The composed config of the run that wrote `ckpt` (`<run_dir>/.hydra/config.yaml`)."""
    path = run_dir_of(ckpt) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the checkpoint is not inside a qkscope run directory")
    return OmegaConf.load(path)


def launch_dir(ckpt: str | Path) -> Path | None:
    """The directory the run that wrote `ckpt` was started from (`hydra.runtime.cwd` in .hydra/hydra.yaml)."""
    path = run_dir_of(ckpt) / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd")
    return Path(cwd) if cwd else None


def run_datamodule(ckpt: str | Path, cache_dir: str | None = None) -> TextDataModule:
    """The run's `TextDataModule`, set up (tokenizer and token arrays from its cache directory).

    The run's own `data.cache_dir`, when relative (the default `runs/cache`), is resolved against the
    directory the run was started from, so a tool started anywhere finds the cache instead of
    re-tokenizing. `cache_dir` overrides it (a relative one is resolved against the current
    directory; if it is missing the corpus is re-tokenized there, deterministically).
    """
    data = OmegaConf.to_container(run_config(ckpt).data, resolve=True)  # ${seed}, ${paths.cache_dir}
    if cache_dir is not None:
        data["cache_dir"] = str(cache_dir)
    elif not Path(data["cache_dir"]).is_absolute() and (base := launch_dir(ckpt)) is not None:
        data["cache_dir"] = str(base / data["cache_dir"])
    if not Path(data["cache_dir"]).is_dir():
        log.warning("data cache %s not found; tokenizing the corpus again", data["cache_dir"])
    dm = instantiate(OmegaConf.create(data))
    dm.setup()
    return dm


def heldout_blocks(ckpt: str | Path, n_blocks: int = 256, cache_dir: str | None = None,
                   split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """The first n_blocks contiguous, non-overlapping blocks of the run's `split` tokens: x, y (N, T)."""
    dm = run_datamodule(ckpt, cache_dir)
    return token_blocks(dm.corpus.tokens(split), dm.config.block_size, n_blocks, f"the {split} split")


def token_blocks(tokens: np.ndarray, T: int, n_blocks: int = 0, what: str = "the text") -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """The first n_blocks contiguous, non-overlapping blocks of T tokens: x, y (N, T), y being x shifted by
    one token; n_blocks <= 0 takes every block."""
    tokens = torch.from_numpy(np.asarray(tokens).astype("int64"))
    available = (len(tokens) - 1) // T
    n = available if n_blocks <= 0 else min(n_blocks, available)
    if n < 2:
        raise ValueError(f"{what} holds {available} blocks of {T} tokens; need at least 2")
    x = tokens[: n * T].view(n, T)  # (N, T)
    y = tokens[1 : n * T + 1].view(n, T)  # (N, T)
    return x, y


def _jsonable(value: object) -> object:
    """NaN/inf become None (strict JSON); tensors and numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(path: str | Path, payload: dict) -> Path:
    """Write `payload` as indented strict JSON (atomically)."""
    return write_json(path, _jsonable(payload))


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """One line per row; the columns are the union of the rows' keys in first-seen order, nested
    values (lists, dicts) as JSON strings."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(_jsonable(v)) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return out


def ckpt_run_dir_resolver(ckpt: str) -> str:
    """OmegaConf resolver `qk.ckpt_run_dir`: the run directory of a checkpoint path, as a string."""
    return str(run_dir_of(ckpt)) if ckpt not in ("", "???") else "."


def register_resolvers() -> None:
    """Register `qk.ckpt_run_dir` (idempotent); the tools' configs default their `out` with it."""
    if not OmegaConf.has_resolver("qk.ckpt_run_dir"):
        OmegaConf.register_new_resolver("qk.ckpt_run_dir", ckpt_run_dir_resolver)


register_resolvers()
