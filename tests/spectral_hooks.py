"""Test hooks: real Lightning callbacks that plant structure in a model's weights mid-training.

Added to a run from the command line, e.g.
    +callbacks.plant._target_=tests.spectral_hooks.PlantSpike +callbacks.plant.layer=1
"""

import lightning as L
import torch


class PlantSpike(L.Callback):
    """At train start, add a strong rank-1 term to one head's W_Q^h and W_K^h (a spike in A_h B_h^T)."""

    def __init__(self, layer: int = 1, head: int = 0, strength: float = 4.0) -> None:
        self.layer, self.head, self.strength = layer, head, strength

    @torch.no_grad()
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        attn = pl_module.model.blocks[self.layer].attn
        dh = attn.head_dim
        rows = slice(self.head * dh, (self.head + 1) * dh)
        g = torch.Generator().manual_seed(0)
        u = torch.randn(attn.q_proj.weight.shape[1], generator=g)
        u = u / u.norm()
        for proj in (attn.q_proj, attn.k_proj):
            w = proj.weight[rows]  # (dh, d_model)
            scale = self.strength * w.norm(dim=1).mean()
            w[0] += scale * u


class PlantNaN(L.Callback):
    """Before optimizer step `step`, put a NaN into layer 0's query weights."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    @torch.no_grad()
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            pl_module.model.blocks[0].attn.q_proj.weight[0, 0] = float("nan")


class PlantLogitBlowup(L.Callback):
    """Before optimizer step `step`, scale one layer's query and key weights by `factor` each
    (its attention logits by factor²): the signature of attention-logit growth, planted."""

    def __init__(self, step: int = 2, layer: int = 0, factor: float = 30.0) -> None:
        self.step, self.layer, self.factor = step, layer, factor

    @torch.no_grad()
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            attn = pl_module.model.blocks[self.layer].attn
            attn.q_proj.weight.mul_(self.factor)
            attn.k_proj.weight.mul_(self.factor)
