"""Divergence guard: stop a run whose loss or gradients turn non-finite, keeping the last finite state.

Every optimizer step, between backward and the update (`on_before_optimizer_step`), the guard
checks that the step's loss (every micro-batch of it) and, optionally, every gradient are
finite: one fused reduction and one host sync per step (a collective under DDP/FSDP, so every
rank takes the same decision). When they are not:

1. the weights are still those of the last finite step: they are saved as
   `<dirpath>/diverged-step<N>.ckpt` (a full training state, resumable), unless the weights
   themselves are already non-finite (changed outside the optimizer), in which case the newest
   checkpoint on disk with finite weights is named instead;
2. the gradients are dropped, so the optimizer leaves the weights unchanged (the non-finite
   update is skipped, never applied);
3. training stops (`trainer.should_stop`) with an error message saying all of the above.

The run is not marked DONE; rerunning the command resumes from checkpoints/last.ckpt.
"""

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class DivergenceGuard(L.Callback):
    """Stop on a non-finite loss or gradient; save the last finite state first.

    dirpath: where diverged-step<N>.ckpt goes (None: save nothing, only stop).
    check_grads: also check every gradient (catches inf gradients from a finite loss). Skipped
        under a GradScaler (fp16), whose inf gradients are routine and handled by the scaler.
    """

    def __init__(self, dirpath: str | None = None, check_grads: bool = True) -> None:
        super().__init__()
        self.dirpath = Path(dirpath) if dirpath else None
        self.check_grads = check_grads
        self._loss_ok: torch.Tensor | None = None
        self.diverged_at: int | None = None  # the step whose update was skipped
        self.stop_reason: str | None = None  # why training was stopped, for the entry point's exit message
        self.saved: Path | None = None  # the checkpoint of the last finite state

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok  # no host sync here

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        ok = self._loss_ok if self._loss_ok is not None else torch.tensor(True, device=pl_module.device)
        self._loss_ok = None
        if self.check_grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:  # the max-abs norm: NaN/inf propagate, finite values never overflow
                ok = ok & torch.nn.utils.get_total_norm(grads, norm_type=float("inf")).isfinite().to(ok.device)
        if trainer.strategy.reduce_boolean_decision(bool(ok), all=True):
            return
        self._diverge(trainer, pl_module, optimizer)

    def _diverge(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        self.diverged_at = step
        weights_ok = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        weights_ok = trainer.strategy.reduce_boolean_decision(weights_ok, all=True)
        if weights_ok and self.dirpath is not None:
            self.saved = self.dirpath / f"diverged-step{step:07d}.ckpt"
            trainer.save_checkpoint(self.saved, weights_only=False)  # before this step's update: the last finite state
            kept = f"the last finite state (step {step}, before this update) is saved in {self.saved}"
        elif weights_ok:
            kept = "no checkpoint written (callbacks.divergence.dirpath is null)"
        else:
            newest = self._newest_finite_checkpoint()
            kept = (f"the weights were already non-finite before this step; the newest finite checkpoint on "
                    f"disk is {newest}" if newest else "the weights were already non-finite; no finite checkpoint "
                    "found on disk")
            self.saved = newest
        for group in optimizer.param_groups:  # no update from non-finite gradients
            for p in group["params"]:
                p.grad = None
        trainer.should_stop = True
        self.stop_reason = f"training diverged at step {step} (NaN/inf loss or gradient)"
        if trainer.is_global_zero:
            log.error(
                "training diverged at step %d: the loss or a gradient is NaN/inf. The update was skipped and "
                "training stopped; %s. Lower optim.lr, raise optim.warmup_steps or check the data, then resume "
                "or start again (resume=never).", step, kept,
            )

    def _newest_finite_checkpoint(self) -> Path | None:
        """The checkpoint in `dirpath` with the highest step whose weights are all finite."""
        if self.dirpath is None or not self.dirpath.is_dir():
            return None
        found = []
        for path in self.dirpath.glob("*.ckpt"):
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a damaged file is not a candidate
                continue
            if all(torch.isfinite(t).all() for t in ckpt.get("state_dict", {}).values() if t.is_floating_point()):
                found.append((int(ckpt.get("global_step", -1)), path))
        return max(found)[1] if found else None
