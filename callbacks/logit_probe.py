"""The fixed held-out batch on which attention logits and activation spectra are measured, shared by the
callbacks that read them."""

import lightning as L
import torch

from analysis.spectral.logits import LogitStats, logit_stats
from models.probe import QKFactors


def probe_batch(trainer: L.Trainer, pl_module: L.LightningModule, n_sequences: int) -> torch.Tensor:
    """The first `n_sequences` validation sequences (B, T): the same tokens at every check and after a resume."""
    x, _ = next(iter(trainer.datamodule.val_dataloader()))
    return x[:n_sequences].to(pl_module.device)


@torch.no_grad()
def activation_factors(pl_module: L.LightningModule, idx: torch.Tensor) -> list[list[QKFactors]]:
    """Every head's queries and keys on `idx` (eval mode) as the QK probe's activation form."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        return pl_module.activation_factors(idx)
    finally:
        pl_module.train(was_training)


@torch.no_grad()
def measure_logits(pl_module: L.LightningModule, idx: torch.Tensor, with_bound: bool = True) -> LogitStats:
    """Per-head max logit and entropy on `idx` (eval mode: no dropout) beside the weight-only bound."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        return logit_stats(pl_module.attention_scores(idx), pl_module.logit_terms() if with_bound else None)
    finally:
        pl_module.train(was_training)
