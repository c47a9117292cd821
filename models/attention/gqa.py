"""Multi-head and grouped-query attention (Vaswani et al. 2017; Ainslie et al. 2023).

MHA is the case n_kv_head == n_head. Query head h reads key/value head g(h) = h // (H / G).
With `qk_norm` every head's query and key are RMS-normalised (one gain of width d_head each,
shared by the heads, as in OLMo 2 and Qwen3) before RoPE: the logit is then bounded by the
gains alone, whatever the projection weights grow to (Wortsman et al. 2023, arXiv 2309.14322).
"""

import torch
from torch import nn

from models.attention.common import causal_attention, repeat_kv
from models.cache import LayerCache
from models.config import GPTConfig
from models.norm import RMSNorm
from models.probe import LogitTerm, QKFactors, input_factor
from models.rope import RotaryEmbedding


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.attention.n_kv_head
        self.head_dim = config.head_dim
        C, H, G, dh = config.d_model, self.n_head, self.n_kv_head, self.head_dim
        self.q_proj = nn.Linear(C, H * dh, bias=config.bias)
        self.k_proj = nn.Linear(C, G * dh, bias=config.bias)
        self.v_proj = nn.Linear(C, G * dh, bias=config.bias)
        self.o_proj = nn.Linear(H * dh, C, bias=config.bias)
        self.rotary = RotaryEmbedding(dh, config.block_size, config.rope_base)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config.norm_eps)  # per-head query norm, gain shared by the heads
            self.k_norm = RMSNorm(dh, config.norm_eps)  # per-head key norm

    def shift_kv(
        self, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook between projection and RoPE; plain attention leaves k, v as they are."""
        return k, v

    def project(
        self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> rotated q (B, H, T, dh) and the (cached) k, v (B, G, S, dh)."""
        B, T, _ = x.shape
        H, G, dh = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        k = self.k_proj(x).view(B, T, G, dh).transpose(1, 2)  # (B, G, T, dh)
        v = self.v_proj(x).view(B, T, G, dh).transpose(1, 2)  # (B, G, T, dh)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        k, v = self.shift_kv(k, v, cache)
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k = cache.extend("k", k, dim=2)  # (B, G, start+T, dh)
            v = cache.extend("v", v, dim=2)
        return q, k, v

    def forward(self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G = self.n_head, self.n_kv_head
        q, k, v = self.project(x, start, cache)
        y = causal_attention(q, repeat_kv(k, H // G), repeat_kv(v, H // G))  # (B, H, T, dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits of x (B, T, C) attending to itself: (B, H, T, T), unmasked."""
        q, k, _ = self.project(x)
        k = repeat_kv(k, self.n_head // self.n_kv_head)  # (B, H, T, dh)
        return (q @ k.transpose(-1, -2)) * self.head_dim**-0.5

    def key_mix(self) -> torch.Tensor:
        """(H,) absolute sum of the weights of the keys mixed into one key: 1 without a shift."""
        return torch.ones(self.n_head, device=self.q_proj.weight.device)

    def logit_terms(self, input_gain: torch.Tensor) -> list[LogitTerm]:
        """The logit as one term: q_h^T R k_h with q, k projections of the normed input (gain
        `input_gain`), or, with qk_norm, of the per-head normalised q, k (norm sqrt(d_head))."""
        H, G, dh = self.n_head, self.n_kv_head, self.head_dim
        if self.qk_norm:
            eye = torch.eye(dh, device=self.q_norm.weight.device)
            query, key = ((eye * n.weight).expand(H, dh, dh) for n in (self.q_norm, self.k_norm))
            query_norm = key_norm = dh**0.5
        else:
            query, query_norm = input_factor(self.q_proj.weight, H, input_gain, self.q_proj.bias)
            key, key_norm = input_factor(self.k_proj.weight, G, input_gain, self.k_proj.bias)
            key = key.repeat_interleave(H // G, dim=0)  # (H, C, dh)
        return [LogitTerm(query, key, query_norm, key_norm, dh**-0.5, self.key_mix(),
                          self.rotary.cos, self.rotary.sin)]

    @torch.no_grad()
    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale head h's logits by eta_h <= 1 through its query and key weights (QK-Clip).

        A key head serves H/G query heads, so it takes sqrt of the smallest eta of its group and
        each query head the rest: the product is exactly eta_h, and eta = 1 changes nothing.
        """
        if self.qk_norm:
            raise ValueError("qk_clip cannot act on a model with model.qk_norm=true: the norms undo any weight scaling")
        H, G = self.n_head, self.n_kv_head
        k_scale = eta.view(G, H // G).amin(dim=1).sqrt()  # (G,)
        q_scale = eta / k_scale.repeat_interleave(H // G)  # (H,)
        for proj, scale, n in ((self.q_proj, q_scale, H), (self.k_proj, k_scale, G)):
            proj.weight.view(n, -1, proj.weight.shape[1]).mul_(scale.to(proj.weight.dtype)[:, None, None])
            if proj.bias is not None:
                proj.bias.view(n, -1).mul_(scale.to(proj.bias.dtype)[:, None])

    def qk_factors(self) -> list[QKFactors]:
        """A_h = W_Q^h^T, B_h = W_K^{g(h)}^T, each (d_model, d_head); RoPE at offset 0."""
        H, G, dh = self.n_head, self.n_kv_head, self.head_dim
        wq = self.q_proj.weight.view(H, dh, -1)  # (H, dh, C)
        wk = self.k_proj.weight.view(G, dh, -1).repeat_interleave(H // G, dim=0)  # (H, dh, C)
        meta = {"scale": dh**-0.5, "n_kv_head": float(G)}
        return [QKFactors(wq.transpose(1, 2), wk.transpose(1, 2), "content", meta)]
