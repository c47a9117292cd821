"""Rotary position embedding (Su et al. 2021), rotate-half convention as in Llama/DeepSeek."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for `dim` rotary channels up to `max_len` positions."""

    def __init__(self, dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_len, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x of shape (..., T, dim) as positions start .. start+T-1."""
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:
            raise ValueError(f"position {start + T} exceeds the rotary table ({self.cos.shape[0]})")
        cos = self.cos[start : start + T].to(x.dtype)  # (T, dim)
        sin = self.sin[start : start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
