"""Multiple-testing decisions over a grid of per-head p-values (docs/methods.md §7).

One check tests m = L·H heads; at a per-head level α the expected number of false alarms per
check is m·α. NaN p-values (non-finite heads) are never rejected and do not count in m.
"""

import torch


def bonferroni(pvalues: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """Reject where p ≤ α/m (Bonferroni): family-wise error ≤ α. Same shape as pvalues, bool."""
    ok = ~torch.isnan(pvalues)
    m = int(ok.sum())
    if m == 0:
        return torch.zeros_like(ok)
    return ok & (pvalues <= alpha / m)


def benjamini_hochberg(pvalues: torch.Tensor, q: float = 0.05) -> torch.Tensor:
    """Benjamini & Hochberg 1995 step-up at false-discovery rate q. Same shape, bool.

    With the finite p-values sorted p_(1) ≤ … ≤ p_(m), let k = max{i : p_(i) ≤ i q/m};
    reject the k smallest (ties at p_(k) included).
    """
    flat = pvalues.reshape(-1).double()
    ok = ~torch.isnan(flat)
    p = flat[ok]
    m = p.numel()
    out = torch.zeros_like(flat, dtype=torch.bool)
    if m == 0:
        return out.reshape(pvalues.shape)
    ps, _ = torch.sort(p)
    below = ps <= q * torch.arange(1, m + 1, dtype=torch.float64) / m
    if bool(below.any()):
        k = int(torch.nonzero(below).max()) + 1
        out[ok] = p <= ps[k - 1]
    return out.reshape(pvalues.shape)
