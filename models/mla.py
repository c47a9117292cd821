"""The Multi-head Latent Attention family: DeepSeek-V2's MLA (decoupled RoPE) and MLA-PreRoPE.

Keys and values of all heads are reconstructed from one small latent per token. MLA
(DeepSeek-V2, arXiv 2405.04434, §2.1):

    c_KV = RMSNorm(W_DKV x)                          (d_c = kv_lora_rank)
    k_h  = [W_UK_h c_KV ; RoPE(W_KR x)]              one rotary key shared by every head
    v_h  = W_UV_h c_KV
    q_h  = [W_UQ_h c_Q ; RoPE(W_QR_h c_Q)]           c_Q = RMSNorm(W_DQ x), or c_Q = x (V2-Lite)

with softmax scale 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim). Module names follow HF's
DeepseekV3Attention (kv_a_proj_with_mqa = [W_DKV; W_KR], kv_b_proj = [W_UK_h; W_UV_h] per head),
and so does bias placement: only the down-projections and o_proj take `config.bias`.

Training and prefill run the naive path (materialise per-head k, v; SDPA). Decoding (a cache
that already holds tokens) runs the absorbed path: W_UK_h is folded into the query
(q_h^T W_UK_h c = (W_UK_h^T q_h)^T c) and W_UV_h into the output, so attention is a one-key-head
attention over [c_KV; k_R] in latent space, and the cache holds only c_KV and the rotated k_R:
(kv_lora_rank + qk_rope_head_dim) elements per token per layer. Set `absorb = False` to decode
by up-projecting the cached latents each step instead (same numbers; a benchmark baseline).

MLA-PreRoPE is the comparison arm of Jha & Reagen 2025 ("rotary applied before compression", as
opposed to DeepSeek's decoupled rotary sub-vector). Their exact definition was not available to
us; this is the standard non-decoupled form that motivated DeepSeek's decoupling (DeepSeek-V2
§2.1.3): the same latent compression, no separate rotary path,

    k_h  = RoPE(W_UK_h c_KV),   v_h = W_UV_h c_KV,   q_h = RoPE(W_UQ_h c_Q)

with softmax scale 1 / sqrt(qk_nope_head_dim); qk_rope_head_dim is unused. The rotation sits
between W_UQ_h and W_UK_h, so W_UK cannot be absorbed into the query: the cache stores every
token's rotated per-head keys "k" and the latent c_KV (values are read from it with W_UV absorbed
into the output), n_head * qk_nope_head_dim + kv_lora_rank elements per token per layer.

Both share the query path (`add_query_projections`, `project_query`, `query_weight`), the
per-head up-projections (`up_weights`) and the padded SDPA call (`padded_attention`);
models/kv_shift.py adds KV shifting to MLA.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.config import AttentionName, GPTConfig
from models.gpt import LayerCache, RMSNorm, RotaryEmbedding, causal_attention, causal_mask, register_attention
from models.probe import LogitTerm, QKFactors, input_factor


def add_query_projections(module: nn.Module, config: GPTConfig, width: int) -> None:
    """Register the query path of `width` channels per head: q_a_proj (W_DQ), q_a_layernorm and q_b_proj
    (the per-head up-projection) with query compression (q_lora_rank > 0), else one q_proj."""
    C, H, rank = config.d_model, config.n_head, config.attention.q_lora_rank
    if rank > 0:
        module.q_a_proj = nn.Linear(C, rank, bias=config.bias)  # W_DQ
        module.q_a_layernorm = RMSNorm(rank, config.norm_eps)
        module.q_b_proj = nn.Linear(rank, H * width, bias=False)  # W_UQ_h (and W_QR_h for MLA)
    else:
        module.q_proj = nn.Linear(C, H * width, bias=False)


def project_query(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) -> the per-head queries (B, H, T, width), not yet rotated."""
    B, T, _ = x.shape
    if module.q_lora_rank > 0:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(x)))  # (B, T, H*width)
    else:
        q = module.q_proj(x)
    return q.view(B, T, module.n_head, -1).transpose(1, 2)  # (B, H, T, width)


def query_weight(module: nn.Module) -> torch.Tensor:
    """The query map from the residual stream, query-latent gain folded in: (H * width, C)."""
    if module.q_lora_rank > 0:
        return (module.q_b_proj.weight * module.q_a_layernorm.weight) @ module.q_a_proj.weight  # W_UQ diag(g_q) W_DQ
    return module.q_proj.weight


def query_input_factor(module: nn.Module, input_gain: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The query side in the coordinates it reads: the normalised query latent c_Q (gain g_q folded in,
    norm sqrt(d_c')), or the block's normed input without compression. -> (H, n_q, width), norm bound."""
    if module.q_lora_rank > 0:
        return input_factor(module.q_b_proj.weight, module.n_head, module.q_a_layernorm.weight)
    return input_factor(module.q_proj.weight, module.n_head, input_gain)


def up_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """W_UK (H, dn, dc) and W_UV (H, dv, dc): the per-head slices (views) of kv_b_proj."""
    w = module.kv_b_proj.weight.view(module.n_head, module.qk_nope_head_dim + module.v_head_dim, -1)
    return w.split([module.qk_nope_head_dim, module.v_head_dim], dim=1)


def latent_attention(q: torch.Tensor, kv: torch.Tensor, d_v: int, scale: float) -> torch.Tensor:
    """Causal attention of H query heads to one key head shared by all (MQA in latent space),
    whose first d_v channels are also the value.

    q: (B, H, T, d), kv: (B, S, d) -> (B, H, T, d_v); the T queries are the last T of the S
    positions. Heads are folded into the query axis, so the shared keys are read once rather
    than expanded to H copies, and value = key keeps SDPA's fused kernels (equal head dims).
    """
    B, H, T, d = q.shape
    S = kv.shape[1]
    q = q.transpose(1, 2).reshape(B, 1, T * H, d)  # (B, 1, T*H, d), row t*H + h
    mask = None
    if T > 1:
        mask = causal_mask(T, S, q.device).repeat_interleave(H, dim=0)  # (T*H, S)
    kv = kv.to(q.dtype)[:, None]  # (B, 1, S, d)
    o = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=scale)  # (B, 1, T*H, d)
    return o[..., :d_v].reshape(B, T, H, d_v).transpose(1, 2)  # (B, H, T, d_v)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """causal_attention with v zero-padded to the query/key width when narrower (MLA's
    v_head_dim < qk_nope_head_dim + qk_rope_head_dim): SDPA's fused kernels need equal widths,
    and without them it materialises the (T, T) score matrix."""
    d_v = v.shape[-1]
    if d_v < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - d_v))
    return causal_attention(q, k, v, scale=scale)[..., :d_v]


@register_attention(AttentionName.mla)
class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2's MLA with decoupled RoPE (module docstring)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        a = config.attention
        self.n_head = config.n_head
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        )
        C, H, dc = config.d_model, config.n_head, a.kv_lora_rank
        dn, dr, dv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        add_query_projections(self, config, dn + dr)  # [W_UQ_h; W_QR_h]
        self.kv_a_proj_with_mqa = nn.Linear(C, dc + dr, bias=config.bias)  # [W_DKV; W_KR]
        self.kv_a_layernorm = RMSNorm(dc, config.norm_eps)
        self.kv_b_proj = nn.Linear(dc, H * (dn + dv), bias=False)  # [W_UK_h; W_UV_h]
        self.o_proj = nn.Linear(H * dv, C, bias=config.bias)
        self.rotary = RotaryEmbedding(dr, config.block_size, config.rope_base)
        self.scale = (dn + dr) ** -0.5
        self.absorb = True  # decode path: absorbed weights, or up-project cached latents each step

    def query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q_nope (B, H, T, dn) and the not yet rotated q_rope (B, H, T, dr)."""
        return project_query(self, x).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> normalised c_KV (B, T, dc) and the not yet rotated k_R (B, T, dr)."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope = self.query(x)  # (B, H, T, dn), (B, H, T, dr)
        c_kv, k_rope = self.latent(x)  # (B, T, dc), (B, T, dr)
        q_rope, k_rope = self.rotary(q_rope, start), self.rotary(k_rope, start)
        if cache is not None:
            c_kv = cache.extend("c_kv", c_kv, dim=1)  # (B, start+T, dc)
            k_rope = cache.extend("k_rope", k_rope, dim=1)  # (B, start+T, dr)
        if cache is not None and self.absorb and start > 0:  # decoding: the cache held tokens
            y = self.absorbed(q_nope, q_rope, c_kv, k_rope)
        else:  # training and prefill
            y = self.naive(q_nope, q_rope, c_kv, k_rope)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def naive(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor
    ) -> torch.Tensor:
        """Materialise per-head keys and values from the S latents; -> (B, H, T, dv)."""
        return padded_attention(*self.heads(q_nope, q_rope, c_kv, k_rope), self.scale)

    def heads(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q (B, H, T, dn+dr), k (B, H, S, dn+dr), v (B, H, S, dv) from the rotated parts."""
        B, S, _ = c_kv.shape
        H, dn = self.n_head, self.qk_nope_head_dim
        kv = self.kv_b_proj(c_kv).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, dn+dv)
        k_nope, v = kv.split([dn, self.v_head_dim], dim=-1)  # (B, H, S, dn), (B, H, S, dv)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, S, -1)], dim=-1)  # (B, H, S, dn+dr)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, dn+dr)
        return q, k, v

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every head's queries and keys [nope; rotated rope] of x (B, T, C) attending to itself, and the
        softmax scale. -> (B, H, T, dn+dr), (B, H, T, dn+dr), scale."""
        q_nope, q_rope = self.query(x)
        c_kv, k_rope = self.latent(x)
        q, k, _ = self.heads(q_nope, self.rotary(q_rope), c_kv, self.rotary(k_rope))
        return q, k, self.scale

    def absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor
    ) -> torch.Tensor:
        """Attend in latent space: all heads read one shared key [c_KV; k_R] and value c_KV; -> (B, H, T, dv)."""
        w_uk, w_uv = up_weights(self)  # (H, dn, dc), (H, dv, dc)
        q = torch.cat([q_nope @ w_uk, q_rope], dim=-1)  # (B, H, T, dc+dr)
        kv = torch.cat([c_kv, k_rope], dim=-1)  # (B, S, dc+dr)
        o = latent_attention(q, kv, self.kv_lora_rank, self.scale)  # (B, H, T, dc)
        return o @ w_uv.transpose(1, 2)  # (B, H, T, dv)

    def qk_factors(self) -> list[QKFactors]:
        """Content: A_h = (W_UQ_h diag(g_q) W_DQ)^T, B_h = (W_UK_h diag(g_kv) W_DKV)^T, (C, dn) each.

        RoPE (at offset 0): A_h = (W_QR_h diag(g_q) W_DQ)^T, B_h = W_KR^T for every head, (C, dr).
        The latent RMSNorms' gains are folded in; their data-dependent 1/RMS factors are positive
        scalars per token and are left out, so the forms are exact up to those per-token scales.
        """
        H, dc = self.n_head, self.kv_lora_rank
        w = query_weight(self).view(H, self.qk_nope_head_dim + self.qk_rope_head_dim, -1)
        wq_nope, wq_rope = w.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=1)  # (H, dn, C), (H, dr, C)
        w_dkv, w_kr = self.kv_a_proj_with_mqa.weight.split([dc, self.qk_rope_head_dim])  # (dc, C), (dr, C)
        w_uk, _ = up_weights(self)  # (H, dn, dc)
        wk_nope = (w_uk * self.kv_a_layernorm.weight) @ w_dkv  # (H, dn, C)
        wk_rope = w_kr.expand(H, -1, -1)  # (H, dr, C)
        meta = {
            "scale": self.scale,
            "q_lora_rank": float(self.q_lora_rank),
            "kv_lora_rank": float(dc),
            "qk_nope_head_dim": float(self.qk_nope_head_dim),
            "qk_rope_head_dim": float(self.qk_rope_head_dim),
        }
        return [
            QKFactors(wq_nope.transpose(1, 2), wk_nope.transpose(1, 2), "content", meta),
            QKFactors(wq_rope.transpose(1, 2), wk_rope.transpose(1, 2), "rope", dict(meta)),
        ]

    def key_mix(self) -> torch.Tensor:
        """(H,) absolute sum of the weights of the keys mixed into one key: 1 without a shift."""
        return torch.ones(self.n_head, device=self.kv_b_proj.weight.device)

    def logit_terms(self, input_gain: torch.Tensor) -> list[LogitTerm]:
        """Content: q^C_h from c_Q, k^C_h = W_UK_h diag(g_kv) of the normalised latent (norm sqrt(d_c)).
        RoPE: q^R_h from c_Q against the shared rotary key W_KR of the normed input (and its bias)."""
        H, dc, dn = self.n_head, self.kv_lora_rank, self.qk_nope_head_dim
        q, q_norm = query_input_factor(self, input_gain)  # (H, n_q, dn+dr)
        w_uk, _ = up_weights(self)  # (H, dn, dc)
        k_nope = (w_uk * self.kv_a_layernorm.weight).transpose(1, 2)  # (H, dc, dn)
        w_kr = self.kv_a_proj_with_mqa.weight[dc:]  # (dr, C)
        b = self.kv_a_proj_with_mqa.bias
        k_rope, k_norm = input_factor(w_kr, 1, input_gain, None if b is None else b[dc:])  # (1, C[+1], dr)
        mix = self.key_mix()
        return [
            LogitTerm(q[..., :dn], k_nope, q_norm, dc**0.5, self.scale, mix),
            LogitTerm(q[..., dn:], k_rope.expand(H, -1, -1), q_norm, k_norm, self.scale, mix,
                      self.rotary.cos, self.rotary.sin),
        ]

    @torch.no_grad()
    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale head h's logits by eta_h <= 1 as Kimi K2's QK-Clip does for MLA: the head's content
        query and key up-projections by sqrt(eta_h) each, its rotary query by eta_h, and the
        rotary key, shared by every head, not at all."""
        H, dn, dr = self.n_head, self.qk_nope_head_dim, self.qk_rope_head_dim
        q_weight = (self.q_b_proj if self.q_lora_rank > 0 else self.q_proj).weight
        q = q_weight.view(H, dn + dr, -1)  # rows of head h: [W_UQ_h; W_QR_h]
        root = eta.sqrt().to(q.dtype)[:, None, None]
        q[:, :dn].mul_(root)
        q[:, dn:].mul_(eta.to(q.dtype)[:, None, None])
        w_uk, _ = up_weights(self)  # (H, dn, dc), a view of kv_b_proj.weight
        w_uk.mul_(root)


@register_attention(AttentionName.mla_prerope)
class MLAPreRoPEAttention(nn.Module):
    """MLA-PreRoPE: latent compression with RoPE on the whole per-head query and key (module docstring)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        a = config.attention
        self.n_head = config.n_head
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.qk_nope_head_dim, self.v_head_dim = a.qk_nope_head_dim, a.v_head_dim
        C, H, dc, dn, dv = config.d_model, config.n_head, a.kv_lora_rank, a.qk_nope_head_dim, a.v_head_dim
        add_query_projections(self, config, dn)  # W_UQ_h
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
        q = self.rotary(project_query(self, x), start)  # (B, H, T, dn)
        c_kv = self.kv_a_layernorm(self.kv_a_proj(x))  # (B, T, dc)
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, H, T, dn+dv)
        k, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (B, H, T, dn), (B, H, T, dv)
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

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every head's rotated queries and keys of x (B, T, C) attending to itself, and the softmax scale.
        -> (B, H, T, dn), (B, H, T, dn), scale."""
        q, k, _, _ = self.heads(x)
        return q, k, self.scale

    def latent_value_attention(self, q: torch.Tensor, k: torch.Tensor, c_kv: torch.Tensor) -> torch.Tensor:
        """Per-head keys, values read from the shared latents with W_UV absorbed; -> (B, H, T, dv).
        The probabilities of all heads multiply c_KV in one batched matmul (latents read once)."""
        B, H, T, _ = q.shape
        S = k.shape[2]
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, T, S)
        if T > 1:
            scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
        p = scores.float().softmax(dim=-1).to(q.dtype).view(B, H * T, S)
        o = (p @ c_kv.to(q.dtype)).view(B, H, T, -1)  # (B, H, T, dc)
        return o @ up_weights(self)[1].transpose(1, 2)  # (B, H, T, dv)

    def qk_factors(self) -> list[QKFactors]:
        """The content form at offset 0 (no rotation): A_h = (W_UQ_h diag(g_q) W_DQ)^T, B_h =
        (W_UK_h diag(g_kv) W_DKV)^T, (C, dn) each; RMSNorm gains folded in, 1/RMS scalars left out.
        At offset Δ the module applies A_h R_Δ B_h^T; there is no separate position-free part."""
        H, dn = self.n_head, self.qk_nope_head_dim
        w_uk, _ = up_weights(self)  # (H, dn, dc)
        wk = (w_uk * self.kv_a_layernorm.weight) @ self.kv_a_proj.weight  # (H, dn, C)
        meta = {
            "scale": self.scale,
            "q_lora_rank": float(self.q_lora_rank),
            "kv_lora_rank": float(self.kv_lora_rank),
            "qk_nope_head_dim": float(dn),
        }
        return [QKFactors(query_weight(self).view(H, dn, -1).transpose(1, 2), wk.transpose(1, 2), "content", meta)]

    def logit_terms(self, input_gain: torch.Tensor) -> list[LogitTerm]:
        """One rotated term: the query from c_Q (norm sqrt(d_c')) or the normed input, the key
        W_UK_h diag(g_kv) of the normalised latent (norm sqrt(d_c)), RoPE between them."""
        query, q_norm = query_input_factor(self, input_gain)  # (H, n_q, dn)
        w_uk, _ = up_weights(self)  # (H, dn, dc)
        key = (w_uk * self.kv_a_layernorm.weight).transpose(1, 2)  # (H, dc, dn)
        mix = torch.ones(self.n_head, device=key.device)
        return [LogitTerm(query, key, q_norm, self.kv_lora_rank**0.5, self.scale, mix,
                          self.rotary.cos, self.rotary.sin)]

    @torch.no_grad()
    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale head h's logits by eta_h <= 1: its query and key up-projections by sqrt(eta_h) each."""
        root = eta.sqrt()[:, None, None]
        q_weight = (self.q_b_proj if self.q_lora_rank > 0 else self.q_proj).weight
        q_weight.view(self.n_head, self.qk_nope_head_dim, -1).mul_(root.to(q_weight.dtype))
        w_uk, _ = up_weights(self)  # (H, dn, dc), a view of kv_b_proj.weight
        w_uk.mul_(root.to(w_uk.dtype))
