"""QK-Clip (Kimi K2, arXiv 2507.20534): after optimizer steps, bring every head's max logit down to tau.

Every `every_n_steps` optimizer steps the callback measures each head's max attention logit S_h
(on the fixed probe batch of `callbacks.logit_probe`, or the weight-only bound with
`source="bound"`) and scales the head's query and key weights so that its logits are multiplied
by eta_h = min(1, tau / S_h) (`pl_module.clip_qk_`, which each attention variant implements:
MLA scales its per-head up-projections and leaves the shared rotary key alone). Heads at or below
tau are left exactly as they were. The optimizer state is not touched, as in K2.

Every rank computes the same factors from the same weights and batch, so DDP replicas stay equal.
Sharded weights (FSDP) are refused.
"""

from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from analysis.spectral.logits import clip_factors, logit_bound
from callbacks.logit_probe import measure_logits, probe_batch

SOURCES = ("measured", "bound")


class QKClip(L.Callback):
    def __init__(self, tau: float = 100.0, every_n_steps: int = 1, source: str = "measured",
                 probe_batch_size: int = 4) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"qk_clip.tau={tau} is invalid: it must be > 0")
        if every_n_steps <= 0:
            raise ValueError(f"qk_clip.every_n_steps={every_n_steps} is invalid: it must be > 0")
        if source not in SOURCES:
            raise ValueError(f"qk_clip.source={source!r} is invalid; allowed: {list(SOURCES)}")
        if probe_batch_size <= 0:
            raise ValueError(f"qk_clip.probe_batch_size={probe_batch_size} is invalid: it must be > 0")
        self.tau, self.every_n_steps, self.source = tau, every_n_steps, source
        self.probe_batch_size = probe_batch_size
        self.clipped_total = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError("qk_clip=on needs whole weights on every rank; it is not available under FSDP")
        if getattr(pl_module.model_config, "qk_norm", False):
            raise ValueError("qk_clip=on has no effect with model.qk_norm=true (the norms undo any weight scaling)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.idx = probe_batch(trainer, pl_module, self.probe_batch_size)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if self.source == "bound":
            s_max = logit_bound(pl_module.logit_terms())
        else:
            s_max = measure_logits(pl_module, self.idx, with_bound=False).max_logit
        eta = clip_factors(s_max, self.tau)
        clipped = int((eta < 1).sum())
        if clipped:
            pl_module.clip_qk_(eta)
            self.clipped_total += clipped
        pl_module.log_dict({"qk_clip/heads_clipped": float(clipped), "qk_clip/max_logit": float(s_max.max()),
                            "qk_clip/clips_total": float(self.clipped_total)}, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"clipped_total": self.clipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped_total = int(state["clipped_total"])
