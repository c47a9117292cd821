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
"""

import torch
from torch import nn

from models.attention.gqa import GroupedQueryAttention
from models.cache import LayerCache
from models.config import GPTConfig
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


class KVShiftAttention(GroupedQueryAttention):
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
