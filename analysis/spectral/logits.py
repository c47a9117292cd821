"""Attention logits from the weights alone, and as measured: the quantities behind logit growth.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities",
arXiv 2309.14322) trace the high-learning-rate failure of transformers without QK-norm to the
attention logits growing until the softmax is one-hot; Zhai et al. 2023 (arXiv 2303.06296) bound
the attention entropy from below by a function falling in ‖W_Q W_Kᵀ‖₂. Both are read here from
the model's `LogitTerm`s (models/probe.py) and from the logits of a probe batch.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from models.probe import LogitTerm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def spectral_norm_upper(M: torch.Tensor, squarings: int = 8) -> torch.Tensor:
    """An upper bound of s₁(M) for a batch (..., m, n), within a factor n^(1/2^(squarings+1)) of it.

        s₁(M)² = λ_max(G) <= tr(G^p)^(1/p),  G = MᵀM,  p = 2^squarings

    (the Schatten p-norm of G bounds its top eigenvalue from above), computed by repeated squaring
    with G rescaled to unit trace at each step, the scales kept in logs. With 8 squarings and
    n = 32 the bound is at most 32^(1/512) − 1 = 0.7% above s₁, and cheaper on CPU than a batched
    SVD of the same matrices; the factor 1 + 1e-5 covers float32 rounding.
    """
    G = M.transpose(-1, -2) @ M  # (..., n, n)
    log_scale = torch.zeros(G.shape[:-2], dtype=G.dtype, device=G.device)
    for k in range(squarings + 1):
        if k:
            G = G @ G
            log_scale = 2 * log_scale
        trace = G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(G.dtype).tiny)
        G = G / trace[..., None, None]
        log_scale = log_scale + trace.log()
    return (log_scale / 2 ** (squarings + 1)).exp() * (1 + 1e-5)


@torch.no_grad()
def term_bound(term: LogitTerm, offsets_per_chunk: int = 128) -> torch.Tensor:
    """(H,) max over inputs and offsets of |part_h(i, j)| for one LogitTerm.

        |part_h| <= scale · key_mix_h · ‖u‖ ‖v‖ · max_{0<=n<T} s₁(query_h R_nᵀ key_hᵀ)

    (Cauchy-Schwarz on the bilinear form; the maximum is attained for some u, v, so the bound is
    the tightest that uses the weights and the input norms alone, up to the <= 0.7% of
    `spectral_norm_upper`). With query_h = Q_q R_q and key_h = Q_k R_k (reduced QR),
    s₁(query_h R_nᵀ key_hᵀ) = s₁((R_q R_nᵀ) R_kᵀ): R_q R_nᵀ is R_q with each row rotated by n
    positions, so every offset costs one r x r matrix.
    """
    r_q = torch.linalg.qr(term.query.float()).R  # (H, k_q, r)
    r_k = torch.linalg.qr(term.key.float()).R  # (H, k_k, r)
    if term.rotary_cos is None:
        s1 = spectral_norm_upper(r_q @ r_k.transpose(-1, -2))  # (H,)
    else:
        s1 = torch.zeros(r_q.shape[0], device=r_q.device)
        for start in range(0, term.rotary_cos.shape[0], offsets_per_chunk):  # bounded memory at long contexts
            cos = term.rotary_cos[start : start + offsets_per_chunk].float()[None, :, None, :]  # (1, n, 1, r)
            sin = term.rotary_sin[start : start + offsets_per_chunk].float()[None, :, None, :]
            rotated = r_q[:, None] * cos + _rotate_half(r_q)[:, None] * sin  # (H, n, k_q, r)
            chunk = spectral_norm_upper(rotated @ r_k[:, None].transpose(-1, -2)).amax(dim=1)  # (H,)
            s1 = torch.maximum(s1, chunk)
    return s1 * term.scale * term.query_norm * term.key_norm * term.key_mix.float().to(s1.device)


@torch.no_grad()
def logit_bound(layers: list[list[LogitTerm]]) -> torch.Tensor:
    """(L, H) weight-only upper bound of every head's |attention logit|: the sum of its terms' bounds."""
    return torch.stack([sum(term_bound(t) for t in terms) for terms in layers]).detach().cpu()


@dataclass
class LogitStats:
    """Per-head attention logits of one probe batch.

    Attributes:
        max_logit: (L, H) max |pre-softmax logit| over the batch's causal (query, key) pairs.
        entropy: (L, H) mean over queries of the attention distribution's entropy, in nats.
        bound: (L, H) the weight-only bound (`logit_bound`).
    """

    max_logit: torch.Tensor
    entropy: torch.Tensor
    bound: torch.Tensor


def head_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal logits (B, H, T, T), -inf where masked -> max |logit| (H,) and mean entropy (H,) in nats.

    Entropy of row p = softmax(s): H(p) = logsumexp(s) − Σ p s (Zhai et al. 2023's attention entropy).
    """
    finite = torch.isfinite(scores)
    max_logit = scores.abs().where(finite, 0.0).amax(dim=(0, 2, 3))  # (H,)
    log_z = scores.logsumexp(dim=-1, keepdim=True)  # (B, H, T, 1)
    p = (scores - log_z).exp()
    entropy = (log_z.squeeze(-1) - (p * scores.where(finite, 0.0)).sum(-1)).mean(dim=(0, 2))  # (H,)
    return max_logit, entropy


def logit_stats(scores: Iterable[torch.Tensor], terms: list[list[LogitTerm]] | None) -> LogitStats:
    """Stats of the per-layer causal logits (`GPT.attention_scores`) beside the weight-only bound
    (NaN when `terms` is None: a caller that needs the measured logits only)."""
    per_layer = [head_stats(s) for s in scores]
    max_logit = torch.stack([m for m, _ in per_layer]).cpu()
    return LogitStats(
        max_logit=max_logit,
        entropy=torch.stack([e for _, e in per_layer]).cpu(),
        bound=logit_bound(terms) if terms is not None else torch.full_like(max_logit, float("nan")),
    )


def clip_factors(max_logit: torch.Tensor, tau: float) -> torch.Tensor:
    """QK-Clip's per-head factor (Kimi K2, arXiv 2507.20534): eta = min(1, tau / S_max) for S_max the
    head's max logit; scaling the head's logits by eta brings S_max down to tau, and leaves heads
    at or below tau exactly as they were (eta = 1)."""
    return torch.where(max_logit > tau, tau / max_logit.clamp_min(1e-30), torch.ones_like(max_logit))
