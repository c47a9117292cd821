"""Scoring an edited model on held-out blocks: what every surgery tool compares against the original."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def block_metrics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block mean next-token loss and top-1 accuracy of x, y (N, T) -> two (N,) arrays."""
    losses, accs = [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        logits, _ = model(xb)  # (b, T, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), yb, reduction="none")  # (b, T)
        losses.append(nll.mean(1))
        accs.append((logits.argmax(-1) == yb).float().mean(1))
    return torch.cat(losses).double().numpy(), torch.cat(accs).double().numpy()
