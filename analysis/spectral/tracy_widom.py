"""The Tracy-Widom law TW₁ (real case, β = 1) and Johnstone's centring and scaling.

TW₁ is computed, not read from a table: F₁(s) is the Fredholm determinant

    F₁(s) = det(I − K_s) on L²(0, ∞),   K_s(x, y) = Ai(x + y + s)

(Ferrari & Spohn 2005, eq. 3; Sasamoto 2005), evaluated by Gauss-Legendre quadrature of the
operator as in Bornemann 2010 ("On the numerical evaluation of distributions in random matrix
theory", Math. Comp. 79). Ai is `torch.special.airy_ai`. With 32 nodes the result agrees with
64 and 96 nodes to 1e-9 and reproduces the standard constants (docs/methods.md §3): mean −1.2065,
sd 1.2680, quantiles 90% 0.4501, 95% 0.9793, 99% 2.0234. The survival function is computed
as −expm1(Σ log1p(−μ_i)) over the eigenvalues μ_i of the discretised kernel, so it stays
accurate in the far right tail (relative accuracy at 1e-20), where the p-values of spikes live.
The table covers s ∈ [−6, 16]; F₁(−6) ≈ 2.7e-6 is treated as 0 below, and above 16 the
survival function follows the leading right-tail asymptotic exp(−⅔ s^{3/2}) s^{−3/2}
matched at s = 16.
"""

import math
from functools import lru_cache

import numpy as np
import torch

_S_LO, _S_HI, _S_STEP, _NODES = -6.0, 16.0, 0.01, 32


@lru_cache(maxsize=1)
def _table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s grid, F₁(s), 1 − F₁(s)) on [−6, 16] in steps of 0.01, float64."""
    s = np.arange(_S_LO, _S_HI + _S_STEP / 2, _S_STEP)
    xg, wg = np.polynomial.legendre.leggauss(_NODES)
    length = np.maximum(12.0, 12.0 - s)  # Ai(s + x) is below 1e-16 beyond x = 12 - s
    x = (xg[None, :] + 1.0) * length[:, None] / 2.0  # (S, m) nodes on [0, length]
    w = wg[None, :] * length[:, None] / 2.0
    arg = x[:, :, None] + x[:, None, :] + s[:, None, None]  # (S, m, m)
    kernel = torch.special.airy_ai(torch.from_numpy(arg)).numpy()
    sw = np.sqrt(w)
    mu = np.linalg.eigvalsh(sw[:, :, None] * kernel * sw[:, None, :])  # (S, m), symmetric kernel
    log_f = np.log1p(-np.minimum(mu, 1.0 - 1e-16)).sum(axis=-1)
    cdf = np.exp(log_f)
    sf = -np.expm1(log_f)
    cdf = np.maximum.accumulate(cdf)  # remove round-off wiggles at the far left
    return s, cdf, sf


def tw1_cdf(s: torch.Tensor | float) -> torch.Tensor:
    """F₁(s), the TW₁ distribution function (Tracy & Widom 1996), float64 tensor of s's shape."""
    grid, cdf, _ = _table()
    x = torch.as_tensor(s, dtype=torch.float64)
    out = torch.from_numpy(np.asarray(np.interp(x.numpy(), grid, cdf, left=0.0, right=1.0)))
    return out.reshape(x.shape)


def tw1_sf(s: torch.Tensor | float) -> torch.Tensor:
    """1 − F₁(s), accurate in the right tail; NaN in, NaN out."""
    grid, _, sf = _table()
    x = torch.as_tensor(s, dtype=torch.float64)
    xs = x.numpy()
    log_sf = np.interp(xs, grid, np.log(np.maximum(sf, 1e-300)), left=0.0)
    hi = xs > _S_HI
    if np.any(hi):
        tail = np.log(sf[-1]) - (2.0 / 3.0) * (xs[hi] ** 1.5 - _S_HI**1.5) - 1.5 * np.log(xs[hi] / _S_HI)
        log_sf = np.array(log_sf, copy=True)
        log_sf[hi] = tail
    out = np.exp(np.minimum(log_sf, 0.0))
    return torch.from_numpy(np.asarray(np.where(np.isnan(xs), np.nan, out))).reshape(x.shape)


def tw1_quantile(p: float) -> float:
    """s with F₁(s) = p, for p in (F₁(−6), 1 − 1e-12), by interpolation of the table."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"tw1_quantile needs 0 < p < 1, got {p}")
    grid, cdf, sf = _table()
    if p > 0.5:  # interpolate log survival for accuracy in the upper tail
        log_sf = np.log(np.maximum(sf, 1e-300))
        return float(np.interp(-math.log1p(-p), -log_sf, grid))
    return float(np.interp(p, cdf, grid))


@lru_cache(maxsize=1)
def tw1_moments() -> tuple[float, float]:
    """(mean, sd) of TW₁ by quadrature of the table: (−1.2065, 1.2680) to 4 decimals."""
    grid, cdf, _ = _table()
    dens = np.gradient(cdf, grid)
    mean = float(np.trapezoid(grid * dens, grid))
    var = float(np.trapezoid((grid - mean) ** 2 * dens, grid))
    return mean, math.sqrt(var)


def johnstone_center_scale(n: int, m: int) -> tuple[float, float]:
    """Centring μ and scale σ of the largest eigenvalue of XᵀX/n for X (n×m) with N(0, 1) entries.

    Johnstone 2001 (Ann. Statist. 29, Thm 1; docs/methods.md §3): for l₁ the top eigenvalue of XᵀX,
    μ = (√(n−1) + √m)², σ = (√(n−1) + √m)(1/√(n−1) + 1/√m)^{1/3}, (l₁ − μ)/σ → TW₁.
    Returned divided by n, i.e. in the units of S = XᵀX/n whose MP edge is (1 + √(m/n))².
    Requires n ≥ 2, m ≥ 1 (symmetric in the roles of n and m up to the −1).
    """
    a = math.sqrt(n - 1) + math.sqrt(m)
    mu = a * a
    sigma = a * (1.0 / math.sqrt(n - 1) + 1.0 / math.sqrt(m)) ** (1.0 / 3.0)
    return mu / n, sigma / n
