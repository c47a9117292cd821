"""KV-shifting attention (Xu et al., "KV Shifting Attention Enhances Language Modeling", arXiv 2411.19574).

Each key/value head mixes the current token's key and value with the previous token's:

    K̂ = α1 K + α2 Shift(K),    V̂ = β1 V + β2 Shift(V)

where Shift moves the sequence one step later (row i of Shift(K) is k_{i-1}, row 0 is zero).
The shift is applied before RoPE, as in the paper's code (Appendix F), so k̂_i is rotated as
position i. α1, α2, β1, β2 are unconstrained learned scalars per key/value head (4 G extra
parameters; the paper found sigmoid gating or clamping no better), initialised α1, β1 ~ U(0, 1),
α2 = 1 − α1, β2 = 1 − β1. Queries are untouched, so MHA and GQA both work (per KV head).

One layer with the shift can express an induction head (the key of token i carries token
i−1's identity); plain attention needs two layers for that. Decoding keeps the previous
token's unshifted key and value as fixed-size cache state.

MLA-KV-shift, Multi-head Latent Attention with KV shifting, is our combination of DeepSeek-V2 MLA
and KV shifting; no paper defines it. We apply the KV-shifting rule per head, before RoPE, to each head's
reconstructed key (content part and rotary part) and value, with learned α1_h, α2_h, β1_h, β2_h
per head (initialised as above), and write c_j for token j's normalised latent c_KV, k^R_j
for its pre-RoPE shared rotary key, R_j for RoPE at position j (c_{-1} = k^R_{-1} = 0):

    k̂^C_{j,h} = α1_h W_UK_h c_j + α2_h W_UK_h c_{j-1}  =  W_UK_h (α1_h c_j + α2_h c_{j-1})
    k̂^R_{j,h} = R_j (α1_h k^R_j + α2_h k^R_{j-1})
    v̂_{j,h}   = W_UV_h (β1_h c_j + β2_h c_{j-1})

Training and prefill materialise these (shift the up-projected per-head keys and values, then
rotate). Because W_UK_h, W_UV_h and R_j are linear, the shift moves onto the latent path and
absorption still works. With q̃_h = W_UK_h^T q^C_h, s_h(t, j) = q̃_h · c_j (MLA's absorbed
content score) and the rotary scores ρ_h(t, j) = q^R_h · R_j k^R_j, ρ'_h(t, j) = q^R_h · R_j k^R_{j-1}
(R_j, not R_{j-1}, rotates the previous token's rotary key, since the shift is pre-RoPE):

    q_t,h · k̂_{j,h} = α1_h (s_h(t, j) + ρ_h(t, j)) + α2_h (s_h(t, j-1) + ρ'_h(t, j))

so the content score of key j-1 is the same latent score matrix shifted by one key. With p_hj
the attention weights (p_h,S = 0), the output is

    Σ_j p_hj v̂_{j,h} = W_UV_h Σ_j (β1_h p_hj + β2_h p_h,j+1) c_j

one read of the latents, each key's weight mixed with the next key's. Decoding thus
costs MLA's absorbed attention plus two small rotary score matrices and O(H T S) elementwise
work, and the cache stays c_KV plus the *pre-RoPE* k^R per token, (kv_lora_rank +
qk_rope_head_dim) elements as in MLA: token j-1's latent is already in the cache, and each step
re-rotates the window's rotary keys (O(S d_R)).

Why per head on the reconstructed keys rather than one shift of c_KV: shifting c_KV with one
pair of scalars would force α = β (keys and values share the latent) and the same shift for
every head, whereas the paper's heads learn different mixes; this form costs no cache either.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.config import AttentionName, GPTConfig
from models.gpt import GroupedQueryAttention, LayerCache, causal_mask, register_attention
from models.mla import MultiHeadLatentAttention, padded_attention, up_weights
from models.probe import QKFactors


def shift(x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """Move x (..., T, d) one step later along T; row 0 becomes `prev` (..., 1, d), or zeros."""
    first = torch.zeros_like(x[..., :1, :]) if prev is None else prev
    return torch.cat([first, x[..., :-1, :]], dim=-2)


def add_shift_weights(module: nn.Module, n: int) -> None:
    """Register the shift weights of n heads on `module`: alpha1, alpha2 (current and previous key) and
    beta1, beta2 (current and previous value), each (n,); alpha1, beta1 ~ U(0, 1), alpha2 = 1 - alpha1,
    beta2 = 1 - beta1 at init."""
    alpha1, beta1 = torch.rand(n), torch.rand(n)
    module.alpha1 = nn.Parameter(alpha1)  # weight of the current key, per head
    module.alpha2 = nn.Parameter(1 - alpha1)  # weight of the previous key
    module.beta1 = nn.Parameter(beta1)  # weight of the current value
    module.beta2 = nn.Parameter(1 - beta1)  # weight of the previous value


def shift_weights(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """α1, α2, β1, β2 of `module` shaped (n, 1, 1), to scale (B, n, T, d) tensors."""
    return tuple(p.to(dtype)[:, None, None] for p in (module.alpha1, module.alpha2, module.beta1, module.beta2))


@register_attention(AttentionName.kv_shift)
class KVShiftAttention(GroupedQueryAttention):
    """KV shifting on MHA/GQA: one set of shift weights per key/value head (module docstring)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        add_shift_weights(self, self.n_kv_head)  # one set per key/value head

    def shift_kv(
        self, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, G, T, dh) -> K̂, V̂; with a cache, continue from its last unshifted k, v."""
        k_prev = cache.get("k_last") if cache is not None else None
        v_prev = cache.get("v_last") if cache is not None else None
        if cache is not None:
            cache.put("k_last", k[:, :, -1:].clone())  # (B, G, 1, dh); a copy, not a view of all T
            cache.put("v_last", v[:, :, -1:].clone())
        a1, a2, b1, b2 = shift_weights(self, k.dtype)
        k_hat = a1 * k + a2 * shift(k, k_prev)  # (B, G, T, dh)
        v_hat = b1 * v + b2 * shift(v, v_prev)
        return k_hat, v_hat

    def key_mix(self) -> torch.Tensor:
        """(H,) |α1| + |α2| of each query head's key head: k̂_j mixes k_j and k_{j-1}."""
        mix = self.alpha1.detach().abs() + self.alpha2.detach().abs()  # (G,)
        return mix.repeat_interleave(self.n_head // self.n_kv_head)

    def qk_factors(self) -> list[QKFactors]:
        """The base attention's factors; the shift weights go into meta (per head and means)."""
        (f,) = super().qk_factors()
        f.meta.update(shift_meta(self.alpha1, self.alpha2, self.beta1, self.beta2))
        return [f]


def shift_meta(*params: torch.Tensor) -> dict[str, float]:
    """alpha1, alpha2, beta1, beta2 (per head) -> loggable scalars "alpha1_h0", ..., "alpha1_mean"."""
    meta = {}
    for name, p in zip(("alpha1", "alpha2", "beta1", "beta2"), params, strict=True):
        values = p.detach().float().cpu()
        meta[f"{name}_mean"] = values.mean().item()
        meta.update({f"{name}_h{i}": v for i, v in enumerate(values.tolist())})
    return meta


@register_attention(AttentionName.mla_kv_shift)
class MLAKVShiftAttention(MultiHeadLatentAttention):
    """MLA with KV shifting per head on the reconstructed keys and values (module docstring)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        add_shift_weights(self, self.n_head)  # one set per head

    def forward(self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q_nope, q_rope = self.query(x)  # (B, H, T, dn), (B, H, T, dr)
        c_kv, k_rope = self.latent(x)  # (B, T, dc), (B, T, dr) pre-RoPE: shifted before rotation
        q_rope = self.rotary(q_rope, start)
        if cache is not None:
            c_kv = cache.extend("c_kv", c_kv, dim=1)  # (B, start+T, dc)
            k_rope = cache.extend("k_rope", k_rope.contiguous(), dim=1)  # (B, start+T, dr)
        key_start = start + T - c_kv.shape[1]  # position of the first key (0 with a cache)
        if cache is not None and self.absorb and start > 0:  # decoding: the cache held tokens
            y = self.shifted_absorbed(q_nope, q_rope, c_kv, k_rope, key_start)
        else:  # training and prefill
            y = self.shifted_naive(q_nope, q_rope, c_kv, k_rope, key_start)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def shifted_naive(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
        key_start: int,
    ) -> torch.Tensor:
        """Shift the materialised per-head keys (before RoPE) and values; -> (B, H, T, dv)."""
        return padded_attention(*self.shifted_heads(q_nope, q_rope, c_kv, k_rope, key_start), self.scale)

    def shifted_heads(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
        key_start: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q (B, H, T, dn+dr), shifted and rotated k (B, H, S, dn+dr), shifted v (B, H, S, dv)."""
        B, S, _ = c_kv.shape
        H, dn, dr = self.n_head, self.qk_nope_head_dim, self.qk_rope_head_dim
        a1, a2, b1, b2 = shift_weights(self, q_nope.dtype)
        kv = self.kv_b_proj(c_kv).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, dn+dv)
        k_nope, v = kv.split([dn, self.v_head_dim], dim=-1)  # (B, H, S, dn), (B, H, S, dv)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, S, dr)], dim=-1)  # (B, H, S, dn+dr)
        k = a1 * k + a2 * shift(k)
        v = b1 * v + b2 * shift(v)
        k_nope, k_rope = k.split([dn, dr], dim=-1)
        k = torch.cat([k_nope, self.rotary(k_rope, key_start)], dim=-1)  # (B, H, S, dn+dr)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, dn+dr)
        return q, k, v

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every head's queries and shifted keys [nope; rotated rope] of x (B, T, C) attending to itself, and
        the softmax scale. -> (B, H, T, dn+dr), (B, H, T, dn+dr), scale."""
        q_nope, q_rope = self.query(x)
        c_kv, k_rope = self.latent(x)
        q, k, _ = self.shifted_heads(q_nope, self.rotary(q_rope), c_kv, k_rope, 0)
        return q, k, self.scale

    def key_mix(self) -> torch.Tensor:
        """(H,) |α1_h| + |α2_h|: head h's key j mixes its keys j and j-1."""
        return self.alpha1.detach().abs() + self.alpha2.detach().abs()

    def shifted_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
        key_start: int,
    ) -> torch.Tensor:
        """The module docstring's latent form: shifted scores, mixed probabilities; -> (B, H, T, dv)."""
        B, H, T, _ = q_nope.shape
        S = c_kv.shape[1]
        a1, a2, b1, b2 = shift_weights(self, q_nope.dtype)
        w_uk, w_uv = up_weights(self)  # (H, dn, dc), (H, dv, dc)
        c = c_kv.to(q_nope.dtype)
        q_lat = (q_nope @ w_uk).view(B, H * T, -1)  # (B, H*T, dc): heads folded, latents read once
        s = (q_lat @ c.transpose(1, 2)).view(B, H, T, S)  # s[..., j] = q̃ . c_j
        q_r = q_rope.reshape(B, H * T, -1)  # (B, H*T, dr)
        r = (q_r @ self.rotary(k_rope, key_start).transpose(1, 2)).view(B, H, T, S)  # q^R . R_j k^R_j
        r_prev = (q_r @ self.rotary(shift(k_rope), key_start).transpose(1, 2)).view(B, H, T, S)  # . R_j k^R_{j-1}
        s_prev = F.pad(s, (1, 0))[..., :-1]  # s_prev[..., j] = q̃ . c_{j-1}, zero at j = 0
        scores = (a1 * (s + r) + a2 * (s_prev + r_prev)) * self.scale  # (B, H, T, S)
        if T > 1:
            scores = scores.masked_fill(~causal_mask(T, S, c.device), float("-inf"))
        p = scores.float().softmax(dim=-1).to(c.dtype)  # (B, H, T, S)
        p_next = F.pad(p, (0, 1))[..., 1:]  # p_next[..., j] = p[..., j+1]: the weight c_j gets as c_{(j+1)-1}
        o = ((b1 * p + b2 * p_next).view(B, H * T, S) @ c).view(B, H, T, -1)  # (B, H, T, dc)
        return o @ w_uv.transpose(1, 2)  # (B, H, T, dv)

    def qk_factors(self) -> list[QKFactors]:
        """MLA's content and rope factors (the unshifted forms); the shift weights go into meta."""
        factors = super().qk_factors()
        for f in factors:
            f.meta.update(shift_meta(self.alpha1, self.alpha2, self.beta1, self.beta2))
        return factors
