"""Per-matrix spectral metrics of an ESD, batched over heads: eigs (N, k) descending, λ = s².

Names follow WeightWatcher where the concept is the same (docs/methods.md §6, `apply_norm_metrics`;
docs/methods.md §6 lists the metrics). All functions are NaN-transparent: a row containing NaN gives NaN.
"""

import math

import torch


def lambda_max(eigs: torch.Tensor) -> torch.Tensor:
    """λ_max = max_i λ_i (WeightWatcher `spectral_norm`; eigs are descending so λ_1)."""
    return eigs[..., 0]


def stable_rank(eigs: torch.Tensor) -> torch.Tensor:
    """Stable rank Σ_i λ_i / λ_max = ‖W‖_F² / ‖W‖₂² (WeightWatcher `stable_rank`; Rudelson & Vershynin 2007).

    Equals k for k equal eigenvalues and 1 for a rank-1 matrix.
    """
    return eigs.sum(-1) / eigs.amax(-1)


def effective_rank(eigs: torch.Tensor) -> torch.Tensor:
    """exp(H(p)), H(p) = −Σ p_i log p_i with p_i = λ_i / Σλ (spectral entropy; cf. Roy & Vetterli 2007,
    who use singular values; here λ = s² as in docs/methods.md §6). k for a flat spectrum, 1 for rank 1.
    """
    p = eigs / eigs.sum(-1, keepdim=True)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))
    plogp = torch.where(torch.isnan(p), p, plogp)
    return torch.exp(-plogp.sum(-1))


def mp_softrank(edge: torch.Tensor, lam_max: torch.Tensor) -> torch.Tensor:
    """mp_softrank = λ₊/λ_max (WeightWatcher `mp_softrank`, docs/methods.md §6): ≈ 1 for noise, → 0 with a spike."""
    return edge / lam_max


def tw_zscore(lam_max: torch.Tensor, center: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(λ_max − center)/scale: the Tracy-Widom score (docs/methods.md §3), center ≈ the finite-size edge."""
    return (lam_max - center) / scale


def num_spikes(eigs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """#{i : λ_i > threshold} (int64; 0 for NaN rows).

    The simple version of the sequential test of docs/methods.md §3: every eigenvalue is compared with
    the threshold for λ_max. The proper sequential test compares λ_k with the threshold of the top
    eigenvalue of the remaining (r − k + 1)-dimensional spectrum, whose edge is lower (smaller
    aspect ratio), so this count never exceeds the sequential one: it is conservative.
    """
    return (eigs > threshold[..., None]).sum(-1)


def ks_distance(eigs: torch.Tensor, null_cdf: torch.Tensor) -> torch.Tensor:
    """Kolmogorov-Smirnov distance sup_x |F_n(x) − F(x)| between the ESD and the null CDF.

    eigs (N, k) in any order and null_cdf (N, k) = F(eigs) element-wise. With the values sorted
    ascending, D = max_i max(i/n − F(x_(i)), F(x_(i)) − (i − 1)/n) (Massey 1951). KS rather than
    Jensen-Shannon because it needs no histogram binning, which is arbitrary for r ≈ 16-64 values.
    """
    n = eigs.shape[-1]
    order = torch.argsort(eigs, dim=-1)
    F = torch.gather(null_cdf, -1, order)
    i = torch.arange(1, n + 1, dtype=F.dtype, device=F.device)
    d = torch.maximum(i / n - F, F - (i - 1) / n).amax(-1)
    bad = torch.isnan(eigs).any(-1) | torch.isnan(null_cdf).any(-1)
    return torch.where(bad, torch.full_like(d, math.nan), d)


def powerlaw_alpha(eigs: torch.Tensor, min_tail: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, xmin) of a power-law tail p(λ) ∝ λ^{−α}, λ ≥ xmin, fitted to each row (WeightWatcher `alpha`).

    Clauset, Shalizi & Newman 2009 (SIAM Review 51), as in the `powerlaw` package WeightWatcher
    calls (docs/methods.md §6): for each candidate xmin among the eigenvalues with at least `min_tail`
    eigenvalues ≥ xmin, the MLE α = 1 + n / Σ_{λ_i ≥ xmin} log(λ_i / xmin) and the KS distance
    between the tail's empirical CDF and 1 − (λ/xmin)^{1−α}; xmin minimises the KS distance.
    NaN when fewer than `min_tail` positive eigenvalues, or the row has NaN.
    """
    x = eigs.double()
    N, k = x.shape
    nan = torch.full((N,), math.nan, dtype=torch.float64, device=x.device)
    if k < min_tail:
        return nan, nan.clone()
    x, _ = torch.sort(x, dim=-1, descending=True)
    logs = torch.log(x.clamp_min(1e-300))
    j = torch.arange(min_tail - 1, k, device=x.device)  # candidate xmin index (tail = 0..j)
    n = (j + 1).double()  # (J,)
    csum = torch.cumsum(logs, -1)[:, j]  # (N, J) Σ_{i ≤ j} log λ_i
    logx_min = logs[:, j]  # (N, J)
    S = csum - n * logx_min
    alpha = 1.0 + n / S  # (N, J)
    i = torch.arange(k, device=x.device)
    in_tail = i[None, :] <= j[:, None]  # (J, k)
    m = (j[:, None] - i[None, :] + 1).double()  # rank of λ_i in the ascending tail, 1..n
    P = 1.0 - torch.exp((1.0 - alpha[:, :, None]) * (logs[:, None, :] - logx_min[:, :, None]))  # (N, J, k)
    dev = torch.maximum((m / n[:, None] - P).abs(), ((m - 1) / n[:, None] - P).abs())
    dev = torch.where(in_tail[None], dev, torch.zeros_like(dev))
    ks = dev.amax(-1)  # (N, J)
    valid = (x[:, j] > 0) & torch.isfinite(alpha) & (S > 0)
    ks = torch.where(valid, ks, torch.full_like(ks, math.inf))
    best = ks.argmin(-1, keepdim=True)
    a = alpha.gather(-1, best).squeeze(-1)
    xm = x[:, j].gather(-1, best).squeeze(-1)
    ok = valid.any(-1) & ~torch.isnan(eigs).any(-1)
    return torch.where(ok, a, nan), torch.where(ok, xm, nan)


def vector_overlap(
    u_prev: torch.Tensor | None, v_prev: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """|⟨u_prev, u⟩|·|⟨v_prev, v⟩| of the top singular vectors at two checks (docs/methods.md §6).

    Sign-invariant, in [0, 1]: 1 when the top direction pair kept its orientation (growth),
    near 0 when it rotated. NaN without a previous check or when shapes differ.
    """
    if u_prev is None or v_prev is None or u_prev.shape != u.shape or v_prev.shape != v.shape:
        return torch.full(u.shape[:-1], math.nan, dtype=torch.float32)
    uu = (u_prev.double().cpu() * u.double().cpu()).sum(-1).abs()
    vv = (v_prev.double().cpu() * v.double().cpu()).sum(-1).abs()
    return (uu * vv).float()
