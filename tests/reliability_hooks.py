"""Fault injection for the reliability tests: real Lightning callbacks, and the entry point run in a child.

Added to a run from the command line, e.g.
    +callbacks.kill._target_=tests.reliability_hooks.KillAt
and armed through the environment, so that the crashed run and its resumption are the same command:
    QKSCOPE_KILL_AT=7            SIGKILL at the end of optimizer step 7 (before that step's checkpoint)
    QKSCOPE_KILL_AT=7:mid_step   SIGKILL after step 8's backward, before its update
    QKSCOPE_KILL_AT=7:in_save    SIGKILL while a checkpoint at step 7 is being serialised
    QKSCOPE_KILL_AT=7:in_save:group   the same, killing the whole process group (W&B's service too)
The training process alone is killed by default (a crash, the OOM killer): W&B's service then
writes what it was sent and exits.
"""

import contextlib
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tests.conftest import run_as_main

KILL_ENV = "QKSCOPE_KILL_AT"
WHERE = ("batch_end", "mid_step", "in_save")


def sigkill_self(group: bool = False) -> None:
    """SIGKILL this process; with `group`, its whole process group (W&B's service too) when it leads one."""
    if group and os.getpgid(0) == os.getpid():
        os.killpg(0, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


class _KillWhenPickled:
    def __init__(self, group: bool) -> None:
        self.group = group

    def __reduce__(self) -> Any:
        sigkill_self(self.group)
        return (int, ())


class KillAt(L.Callback):
    """SIGKILL the run at the step (and point within it) named by $QKSCOPE_KILL_AT; inert when it is unset."""

    def __init__(self) -> None:
        spec = os.environ.get(KILL_ENV, "")
        step, where, target = [*spec.split(":"), "", "", ""][:3]
        self.step = int(step) if step else None
        self.where, self.group = where or "batch_end", target == "group"
        if self.where not in WHERE or target not in ("", "group", "process"):
            raise ValueError(f"{KILL_ENV}={spec!r}: expected STEP[:{'|'.join(WHERE)}[:group|process]]")

    def _now(self, trainer: L.Trainer, where: str) -> bool:
        return self.step is not None and self.where == where and trainer.global_step == self.step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._now(trainer, "batch_end"):
            sigkill_self(self.group)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._now(trainer, "mid_step"):
            sigkill_self(self.group)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._now(trainer, "in_save"):
            checkpoint["_kill"] = _KillWhenPickled(self.group)  # torch.save pickles it, half way through the save


class LossToNaN(L.Callback):
    """Before optimizer step `step`, scale layer 0's W_Q and W_K by 1e30: the weights stay finite (~1e28),
    the attention scores overflow to inf and softmax turns them into NaN, so the loss goes NaN through
    the model's own arithmetic (as after an overflowing update)."""

    def __init__(self, step: int = 5, scale: float = 1e30) -> None:
        self.step, self.scale = step, scale

    @torch.no_grad()
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            attn = pl_module.model.blocks[0].attn
            attn.q_proj.weight.mul_(self.scale)
            attn.k_proj.weight.mul_(self.scale)


class SVDFails(L.Callback):
    """From train start on, every SVD/eigendecomposition in this process raises torch.linalg.LinAlgError
    (LAPACK's "failed to converge"); training itself uses none."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise torch.linalg.LinAlgError("linalg.svd: the algorithm failed to converge (injected fault)")

        for name in ("svd", "svdvals", "eigh", "eigvalsh"):
            setattr(torch.linalg, name, fail)


# ---------------------------------------------------------------------------------------------
# Running the real entry point in a child process
# ---------------------------------------------------------------------------------------------


@dataclass
class ChildRun:
    """How a child run of `python -m trainer.train` ended."""

    returncode: int  # the exit status; -9 when SIGKILLed
    output: str  # stdout and stderr, interleaved
    seconds: float


def run_forked(args: Sequence[str], env: dict[str, str] | None = None, prepare: Callable[[], None] | None = None,
               timeout: float = 300, grace: float = 30) -> ChildRun:
    """Run `python -m trainer.train *args` in a forked child of the test process.

    The child is a real, separate process (its own session and process group, killable with
    SIGKILL, with its own W&B service), that runs the unmodified entry point through runpy exactly
    as `python -m` does; forking skips the ~10 s of importing torch, Lightning and Hydra again.
    `prepare` runs in the child first (fault injection); `env` is added to its environment. After
    the child ends, what is left of its process group (W&B's service of a killed run, which writes
    what it was sent, then exits) gets `grace` seconds before it is killed.
    """
    import tempfile

    torch.set_num_threads(1)  # the same in every child, so that runs compare bit for bit
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.setsid()
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                os.environ.update({"WANDB_MODE": "offline", **(env or {})})
                if prepare is not None:
                    prepare()
                code = run_as_main("trainer.train", args)
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                os._exit(code)
        deadline = start + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"trainer.train {' '.join(args)} ran past {timeout} s")
            time.sleep(0.05)
        _await_group_exit(pid, grace)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return ChildRun(os.waitstatus_to_exitcode(status), text, time.monotonic() - start)


class PlantSpikeAt(L.Callback):
    """Before optimizer step `step` (only then, so a resumed run that restored the weights does not plant it
    twice), add a strong rank-1 term to one head's W_Q^h and W_K^h: a spectral spike the next check alerts on."""

    def __init__(self, step: int = 0, layer: int = 0, head: int = 0, strength: float = 4.0) -> None:
        self.step, self.layer, self.head, self.strength = step, layer, head, strength

    @torch.no_grad()
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        attn = pl_module.model.blocks[self.layer].attn
        rows = slice(self.head * attn.head_dim, (self.head + 1) * attn.head_dim)
        u = torch.randn(attn.q_proj.weight.shape[1], generator=torch.Generator().manual_seed(self.step))
        u = u / u.norm()
        for proj in (attn.q_proj, attn.k_proj):
            w = proj.weight[rows]  # (d_head, d_model)
            w[0] += self.strength * w.norm(dim=1).mean() * u


def _await_group_exit(pgid: int, grace: float) -> None:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


BALLAST = "ballast"  # the file DiskFaultAt fills a disk with


def fill_disk(path: Path) -> None:
    """Write zeros to `path` until its filesystem is full (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:  # ENOSPC: the disk is full
        pass
    finally:
        os.close(fd)


class DiskFaultAt(L.Callback):
    """At the end of optimizer step `step`, fill the filesystem mounted at `path` (a real tmpfs the test
    mounted) with a ballast file until ENOSPC; the test removes the ballast afterwards."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            fill_disk(self.path / BALLAST)


class DeleteWandbAt(L.Callback):
    """After optimizer step `step`, delete the run's wandb/ directory (a user's `rm -rf` mid-run)."""

    def __init__(self, step: int, run_dir: str) -> None:
        self.step, self.run_dir = step, Path(run_dir)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            shutil.rmtree(self.run_dir / "wandb")
