"""Helpers shared by the attention variants."""

import torch
import torch.nn.functional as F


def causal_mask(Tq: int, Tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: the Tq queries are the last Tq of the Tk positions
    (bottom-right aligned), so query i sees keys j <= i + Tk - Tq."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal scaled dot-product attention where the Tq queries are the last Tq of the Tk keys.

    q: (B, H, Tq, d_qk), k: (B, H, Tk, d_qk), v: (B, H, Tk, d_v) -> (B, H, Tq, d_v).
    Training and prefill (Tq == Tk) use SDPA's fused causal path; one-token decode needs no
    mask; chunked decode uses the bottom-right aligned causal mask.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device), scale=scale)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, T, d) -> (B, G * n_rep, T, d): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, G, T, d = x.shape
    return x[:, :, None].expand(B, G, n_rep, T, d).reshape(B, G * n_rep, T, d)
