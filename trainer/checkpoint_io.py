"""Checkpoint files that survive crashes: atomic writes, integrity checks, safe loading.

Writing (`AtomicCheckpointIO.save_checkpoint`): `torch.save` streams into a temporary file in the
checkpoint's own directory, which is flushed and fsync'ed, then renamed over the target
(`os.replace`, atomic on POSIX), and the directory is fsync'ed. At every instant the target is
either the old complete file or the new complete one; a crash leaves at most a `.NAME.*.tmp`
file, which `RunDirectory` removes. Overwriting last.ckpt first keeps the old version as
`last.prev.ckpt` (a hard link, so last.ckpt never disappears): the previous good state.

Checking (`verify_checkpoint`): a checkpoint is a zip archive whose members carry CRC-32s;
every member is read and its CRC compared (a truncated file has no central directory, a
flipped bit fails its member's CRC, which `torch.load` itself does not check), then the
archive is loaded with `weights_only=True`.

Loading (`AtomicCheckpointIO.load_checkpoint`, used by `Trainer.fit(ckpt_path=...)`): always
`torch.load(..., weights_only=True)`: tensors and plain containers only, no arbitrary pickle
execution. Lightning 2.6 passes `weights_only=None` on resume, which defers to torch's default.
"""

import contextlib
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

log = logging.getLogger(__name__)

PREVIOUS_SUFFIX = ".prev"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupted or not a checkpoint; the message names the file."""


def previous_path(path: str | Path) -> Path:
    """Where the overwritten version of `path` is kept: last.ckpt -> last.prev.ckpt."""
    path = Path(path)
    return path.with_name(f"{path.stem}{PREVIOUS_SUFFIX}{path.suffix}")


def temporary_files(directory: str | Path) -> list[Path]:
    """Leftover temporary files of interrupted writes in `directory`."""
    directory = Path(directory)
    return sorted(directory.glob(".*.tmp")) if directory.is_dir() else []


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsync'ed
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_verified(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """The checkpoint dict of `path`, after every zip member's CRC-32 verified, loaded with
    `weights_only=True` (a pickle that names any other global is refused, never executed).

    Raises CorruptCheckpointError naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and compares its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptCheckpointError(
            f"{path} is truncated or not a checkpoint ({path.stat().st_size} bytes; zip archive unreadable: {e})"
        ) from e
    if bad is not None:
        raise CorruptCheckpointError(f"{path} is corrupted: member {bad!r} fails its CRC-32 check")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError (a disallowed global), RuntimeError (a broken record), ...
        lines = str(e).splitlines() or [repr(e)]
        why = next((ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in lines
                    if "WeightsUnpickler error:" in ln), lines[0])
        raise CorruptCheckpointError(f"{path} cannot be loaded with weights_only=True: {why}") from e
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"{path} is not a training checkpoint: it holds a {type(checkpoint).__name__}")
    missing = [k for k in ("state_dict", "global_step") if k not in checkpoint]
    if missing:
        raise CorruptCheckpointError(f"{path} is not a training checkpoint: it has no {missing}")
    return checkpoint


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check `path` end to end (`load_verified`) and return its metadata (`global_step`, `epoch`)."""
    checkpoint = load_verified(path)
    return {"global_step": int(checkpoint["global_step"]), "epoch": int(checkpoint.get("epoch", 0))}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: temp file + fsync + rename on save; `weights_only=True` on load.

    keep_previous: names (stems) of the checkpoints whose overwritten version is kept as STEM.prev.ckpt.
    fsync: flush file and directory to the device before and after the rename (survives power loss).
    """

    def __init__(self, keep_previous: Sequence[str] = ("last",), fsync: bool = True) -> None:
        super().__init__()
        self.keep_previous, self.fsync = tuple(keep_previous), fsync

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write `checkpoint` to `path` atomically (local paths; remote ones go through Lightning's writer)."""
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            if path.stem in self.keep_previous and path.exists():
                self._keep(path)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(path.parent)

    @staticmethod
    def _keep(path: Path) -> None:
        """path -> NAME.prev.ckpt, leaving `path` in place (hard link; a copy where links are unsupported)."""
        prev = previous_path(path)
        tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)

    def load_checkpoint(self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """torch.load with weights_only=True whatever the caller asks; a broken file is named in the error."""
        if weights_only is False:
            log.warning("weights_only=False requested for %s; loading with weights_only=True", path)
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise CorruptCheckpointError(f"{path} cannot be loaded with weights_only=True: {e}") from e
