"""The QK probe: every attention module exposes its query-key bilinear forms.

For head h the pre-softmax score between residual-stream vectors x_i and x_j is

    score_h(i, j) = x_i^T A_h B_h^T x_j   (times the softmax scale, with RoPE applied)

so the spectral tools above `models/` never need to know how a variant is built.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch

QKKind = Literal["content", "rope", "activation"]


@dataclass
class QKFactors:
    """Left/right factors of every head's query-key bilinear form in one layer.

    Attributes:
        left: (H, d_model, r) tensor, A_h (the query side, e.g. W_Q^h transposed).
        right: (H, d_model, r) tensor, B_h (the key side, e.g. W_K^{g(h)} transposed).
        kind: "content" for the position-free part, "rope" for MLA's decoupled rotary part;
            "activation" for the activation form (`GPT.activation_factors`: (H, tokens, d) queries and keys).
        meta: per-variant scalars worth logging (KV-shift alpha/beta, MLA ranks, scale).
    """

    left: torch.Tensor
    right: torch.Tensor
    kind: QKKind = "content"
    meta: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.left.shape != self.right.shape or self.left.dim() != 3:
            raise ValueError(
                f"QKFactors need left and right of equal shape (H, d_model, r); "
                f"got {tuple(self.left.shape)} and {tuple(self.right.shape)}"
            )

    @property
    def n_head(self) -> int:
        return self.left.shape[0]

    @property
    def rank(self) -> int:
        return self.left.shape[2]


@dataclass
class LogitTerm:
    """One additive part of every head's pre-softmax attention logit, in inputs of bounded norm.

    For head h, a query at position i and the key at position j <= i, the part is

        scale * Σ_m c_hm · u_i^T query_h R_{i-j}^T key_h^T v_{j-m}

    where u_i, v_j are the vectors the query and key sides read (an RMS-normalised activation,
    so ‖u‖ <= query_norm and ‖v‖ <= key_norm, the square roots of their widths, with the norm
    gains folded into the factors), R_n is RoPE's rotation by n positions (identity when the
    term has no rotary tables) and c_hm are the weights of the keys mixed into one key (KV
    shifting: α1, α2), whose absolute sum is key_mix_h. This is all a weight-only bound of the
    logit needs (analysis/spectral/logits.py).

    Attributes:
        query: (H, n_q, r) query-side factor, q_h = query_h^T u.
        key: (H, n_k, r) key-side factor, k_h = key_h^T v.
        query_norm, key_norm: bounds of ‖u‖ and ‖v‖.
        scale: the softmax scale.
        key_mix: (H,) absolute sum of the key mixing weights (ones without KV shifting).
        rotary_cos, rotary_sin: (T, r) RoPE tables (rotate-half convention), or None.
    """

    query: torch.Tensor
    key: torch.Tensor
    query_norm: float
    key_norm: float
    scale: float
    key_mix: torch.Tensor
    rotary_cos: torch.Tensor | None = None
    rotary_sin: torch.Tensor | None = None


def input_factor(weight: torch.Tensor, n_head: int, gain: torch.Tensor,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """A projection y = W (g ⊙ x̂) + b of an RMS-normalised x̂ (‖x̂‖ = sqrt(C)) as a bilinear factor.

    weight (n_head * r, C), gain (C,), bias (n_head * r,) or None -> the factor (H, C[+1], r)
    and the norm bound of its input: with a bias the input is [x̂; 1] and the bias is its last
    row, so the bound is sqrt(C + 1).
    """
    C = weight.shape[1]
    factor = (weight * gain).view(n_head, -1, C).transpose(1, 2)  # (H, C, r)
    if bias is None:
        return factor, C**0.5
    return torch.cat([factor, bias.view(n_head, 1, -1)], dim=1), (C + 1) ** 0.5  # (H, C+1, r)
