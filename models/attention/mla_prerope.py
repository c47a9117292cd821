"""MLA-PreRoPE: latent-compressed attention with RoPE on the whole per-head query and key.

The comparison arm of Jha & Reagen 2025 ("MLA-PreRoPE: rotary applied before compression",
as opposed to MLA-Decoupled, DeepSeek's shared rotary sub-vector). Their exact definition was
not available to us; this is the standard non-decoupled form that motivated DeepSeek's
decoupling (DeepSeek-V2 §2.1.3): the same latent compression as MLA, no separate rotary path,

    c_KV = RMSNorm(W_DKV x)                        (d_c = kv_lora_rank)
    k_h  = RoPE(W_UK_h c_KV),   v_h = W_UV_h c_KV  (qk_nope_head_dim, v_head_dim per head)
    q_h  = RoPE(W_UQ_h c_Q)                        c_Q = RMSNorm(W_DQ x), or c_Q = x

with softmax scale 1 / sqrt(qk_nope_head_dim); qk_rope_head_dim is unused. The rotation R_j sits
between W_UQ_h and W_UK_h (q_i^T R_{j-i} k_j), so W_UK cannot be absorbed into the query and
decoding needs every cached token's rotated per-head key. The cache therefore stores those
keys, "k" (n_head * qk_nope_head_dim per token), and the latent c_KV (kv_lora_rank per token),
from which values are read with W_UV absorbed into the output: n_head * qk_nope_head_dim +
kv_lora_rank elements per token per layer, more than MLA's kv_lora_rank + qk_rope_head_dim.
(Caching c_KV alone would cost kv_lora_rank but recompute every key each step.)
"""

import torch
from torch import nn

from models.attention.common import causal_mask
from models.attention.mla import padded_attention
from models.cache import LayerCache
from models.config import GPTConfig
from models.norm import RMSNorm
from models.probe import LogitTerm, QKFactors, input_factor
from models.rope import RotaryEmbedding


class MLAPreRoPEAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        a = config.attention
        self.n_head = config.n_head
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.qk_nope_head_dim, self.v_head_dim = a.qk_nope_head_dim, a.v_head_dim
        C, H, dc, dn, dv = config.d_model, config.n_head, a.kv_lora_rank, a.qk_nope_head_dim, a.v_head_dim
        if a.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(C, a.q_lora_rank, bias=config.bias)  # W_DQ
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, config.norm_eps)
            self.q_b_proj = nn.Linear(a.q_lora_rank, H * dn, bias=False)  # W_UQ_h
        else:
            self.q_proj = nn.Linear(C, H * dn, bias=False)
        self.kv_a_proj = nn.Linear(C, dc, bias=config.bias)  # W_DKV
        self.kv_a_layernorm = RMSNorm(dc, config.norm_eps)
        self.kv_b_proj = nn.Linear(dc, H * (dn + dv), bias=False)  # [W_UK_h; W_UV_h]
        self.o_proj = nn.Linear(H * dv, C, bias=config.bias)
        self.rotary = RotaryEmbedding(dn, config.block_size, config.rope_base)
        self.scale = dn**-0.5

    def heads(
        self, x: torch.Tensor, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> rotated q, k (B, H, T, dn), v (B, H, T, dv) and the latent c_KV (B, T, dc)."""
        B, T, _ = x.shape
        H, dn = self.n_head, self.qk_nope_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank > 0 else self.q_proj(x)
        q = self.rotary(q.view(B, T, H, dn).transpose(1, 2), start)  # (B, H, T, dn)
        c_kv = self.kv_a_layernorm(self.kv_a_proj(x))  # (B, T, dc)
        kv = self.kv_b_proj(c_kv).view(B, T, H, -1).transpose(1, 2)  # (B, H, T, dn+dv)
        k, v = kv.split([dn, self.v_head_dim], dim=-1)  # (B, H, T, dn), (B, H, T, dv)
        return q, self.rotary(k, start), v, c_kv

    def forward(self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v, c_kv = self.heads(x, start)
        if cache is not None:
            k = cache.extend("k", k, dim=2)  # (B, H, start+T, dn)
            c_kv = cache.extend("c_kv", c_kv, dim=1)  # (B, start+T, dc)
        if cache is not None and start > 0:  # decoding: values from the cached latents
            y = self.latent_value_attention(q, k, c_kv)
        else:  # training and prefill
            y = padded_attention(q, k, v, self.scale)  # (B, H, T, dv)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attention_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits of x (B, T, C) attending to itself: (B, H, T, T), unmasked."""
        q, k, _, _ = self.heads(x)
        return (q @ k.transpose(-1, -2)) * self.scale

    def latent_value_attention(self, q: torch.Tensor, k: torch.Tensor, c_kv: torch.Tensor) -> torch.Tensor:
        """Per-head keys, values read from the shared latents with W_UV absorbed; -> (B, H, T, dv).

        The probabilities of all heads multiply c_KV in one batched matmul, so the latents are
        read once instead of being expanded to H value heads.
        """
        B, H, T, _ = q.shape
        S = k.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, T, S)
        if T > 1:
            scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
        p = scores.float().softmax(dim=-1).to(q.dtype).view(B, H * T, S)
        o = (p @ c_kv.to(q.dtype)).view(B, H, T, -1)  # (B, H, T, dc)
        return o @ self.up_weights()[1].transpose(1, 2)  # (B, H, T, dv)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, dn, dc) and W_UV (H, dv, dc): the per-head slices of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.n_head, self.qk_nope_head_dim + self.v_head_dim, -1)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    def qk_factors(self) -> list[QKFactors]:
        """The content form at offset 0 (no rotation): A_h = (W_UQ_h diag(g_q) W_DQ)^T, B_h =
        (W_UK_h diag(g_kv) W_DKV)^T, (C, dn) each; RMSNorm gains folded in, 1/RMS scalars left out.

        At offset Δ the module applies A_h R_Δ B_h^T; there is no separate position-free part.
        """
        H, dn = self.n_head, self.qk_nope_head_dim
        if self.q_lora_rank > 0:
            wq = (self.q_b_proj.weight * self.q_a_layernorm.weight) @ self.q_a_proj.weight  # (H*dn, C)
        else:
            wq = self.q_proj.weight
        w_uk, _ = self.up_weights()  # (H, dn, dc)
        wk = (w_uk * self.kv_a_layernorm.weight) @ self.kv_a_proj.weight  # (H, dn, C)
        meta = {
            "scale": self.scale,
            "q_lora_rank": float(self.q_lora_rank),
            "kv_lora_rank": float(self.kv_lora_rank),
            "qk_nope_head_dim": float(dn),
        }
        return [QKFactors(wq.view(H, dn, -1).transpose(1, 2), wk.transpose(1, 2), "content", meta)]

    def logit_terms(self, input_gain: torch.Tensor) -> list[LogitTerm]:
        """One rotated term: the query from c_Q (norm sqrt(d_c')) or the normed input, the key
        W_UK_h diag(g_kv) of the normalised latent (norm sqrt(d_c)), RoPE between them."""
        H = self.n_head
        if self.q_lora_rank > 0:
            query, q_norm = input_factor(self.q_b_proj.weight, H, self.q_a_layernorm.weight)  # (H, d_c', dn)
        else:
            query, q_norm = input_factor(self.q_proj.weight, H, input_gain)  # (H, C, dn)
        w_uk, _ = self.up_weights()  # (H, dn, dc)
        key = (w_uk * self.kv_a_layernorm.weight).transpose(1, 2)  # (H, dc, dn)
        mix = torch.ones(H, device=key.device)
        return [LogitTerm(query, key, q_norm, self.kv_lora_rank**0.5, self.scale, mix,
                          self.rotary.cos, self.rotary.sin)]

    @torch.no_grad()
    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale head h's logits by eta_h <= 1: its query and key up-projections by sqrt(eta_h) each."""
        root = eta.sqrt()[:, None, None]
        q_weight = (self.q_b_proj if self.q_lora_rank > 0 else self.q_proj).weight
        q_weight.view(self.n_head, self.qk_nope_head_dim, -1).mul_(root.to(q_weight.dtype))
        w_uk, _ = self.up_weights()  # (H, dn, dc), a view of kv_b_proj.weight
        w_uk.mul_(root.to(w_uk.dtype))
