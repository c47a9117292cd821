"""Random-matrix formulas: Marchenko-Pastur, the product law MP_γ ⊠ MP_γ, BBP, robust σ².

Units. γ = M/N ≤ 1 is the aspect ratio of an N×M factor with i.i.d. entries of variance σ²;
its ESD is the eigenvalues of S = XᵀX/N (docs/methods.md §2). The product law is stated for the
normalised ESD of A Bᵀ, λ = s²/(N² σ_A² σ_B²), whose mean is 1 (docs/methods.md §5).

Everything here is float64 numpy on small grids (cached by γ), exposed through torch where it
touches per-head tensors. Numerical CDFs integrate the density after a substitution that removes the edge
singularities (`_tabulate`).
"""

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from analysis.spectral.tracy_widom import johnstone_center_scale, tw1_quantile

_GRID = 2049  # points of the tabulated CDFs

# ---------------------------------------------------------------- Marchenko-Pastur (docs/methods.md §2)


def mp_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    """MP bulk edges λ± = σ²(1 ± √γ)² (Marchenko & Pastur 1967; docs/methods.md §2), γ = M/N ≤ 1."""
    _check_gamma(gamma)
    r = math.sqrt(gamma)
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def mp_density(x: torch.Tensor, gamma: float, sigma2: float = 1.0) -> torch.Tensor:
    """MP density ρ(λ) = √((λ₊ − λ)(λ − λ₋)) / (2π σ² γ λ) on [λ₋, λ₊], 0 elsewhere.

    Marchenko & Pastur 1967; docs/methods.md §2 (for γ ≤ 1 there is no atom at zero).
    Integrates to 1 with mean σ² and variance γσ⁴.
    """
    lo, hi = mp_edges(gamma, sigma2)
    x = torch.as_tensor(x, dtype=torch.float64)
    inside = (x > lo) & (x < hi)
    val = torch.sqrt(((hi - x) * (x - lo)).clamp_min(0.0)) / (2 * math.pi * sigma2 * gamma * x)
    return torch.where(inside, val, torch.zeros_like(val))


@lru_cache(maxsize=64)
def _mp_table(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(λ grid, CDF) of MP(γ, 1) on its support."""
    return _tabulate(lambda lam: mp_density(torch.from_numpy(lam), gamma).numpy(), *mp_edges(gamma))


def mp_cdf(x: torch.Tensor, gamma: float, sigma2: float = 1.0) -> torch.Tensor:
    """MP distribution function, by numerical integration of `mp_density` (tabulated per γ)."""
    lam, cdf = _mp_table(_key(gamma))
    return _interp(torch.as_tensor(x, dtype=torch.float64) / sigma2, lam, cdf)


def mp_quantile(p: float, gamma: float, sigma2: float = 1.0) -> float:
    """λ with MP_CDF(λ) = p (inverse of `mp_cdf`)."""
    lam, cdf = _mp_table(_key(gamma))
    return sigma2 * float(np.interp(p, cdf, lam))


def mp_tw_threshold(n: int, m: int, level: float, sigma2: float = 1.0) -> float:
    """Top-eigenvalue threshold σ²(μ + s·q_{TW₁}(1 − level)) for S = XᵀX/n, X n×m (docs/methods.md §3).

    μ, s are Johnstone's centring and scale in the units of S (`johnstone_center_scale`), so at
    level α a pure-noise matrix exceeds it with probability → α.
    """
    mu, s = johnstone_center_scale(n, m)
    return sigma2 * (mu + s * tw1_quantile(1.0 - level))


# ------------------------------------------------------ product law MP_γ ⊠ MP_γ (docs/methods.md §5)


def product_edge(gamma: float) -> float:
    """Upper edge of MP_γ ⊠ MP_γ (mean 1): λ₊ = min_{z>0} (1 + z)(1 + γz)²/z (docs/methods.md §5).

    Derivation [I]: the S-transform of MP_γ (mean 1) is 1/(1 + γz), so the product has
    S(z) = 1/(1 + γz)², its inverse moment function χ(z) = z/((1 + z)(1 + γz)²), and the
    support edges are the critical values of 1/χ. Values: γ = 0.125 → 2.334, 0.25 → 3.098,
    0.5 → 4.409, 1 → 6.75 (Fuss-Catalan).
    """
    return _product_edges(_key(gamma))[1]


@lru_cache(maxsize=64)
def _product_edges(gamma: float) -> tuple[float, float]:
    """(lower, upper) edges of MP_γ ⊠ MP_γ: local max of f(z) = (1+z)(1+γz)²/z on (−1/γ, −1)
    (0 when γ = 1) and its min on (0, ∞), located by golden-section search."""
    _check_gamma(gamma)

    def f(z: float) -> float:
        return (1 + z) * (1 + gamma * z) ** 2 / z

    hi = _golden(f, 1e-9, 1e6, minimise=True)[1]
    lo = 0.0 if gamma >= 1.0 else _golden(f, -1.0 / gamma, -1.0, minimise=False)[1]
    return lo, hi


def product_density(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Density of MP_γ ⊠ MP_γ (free multiplicative convolution, mean 1; Voiculescu 1987) [I].

    With ψ(u) = Σ_k m_k u^k the moment function, χ = ψ⁻¹ gives u(1 + ψ)(1 + γψ)² = ψ, i.e. the
    cubic  uγ²ψ³ + u(γ² + 2γ)ψ² + (u(1 + 2γ) − 1)ψ + u = 0  at u = 1/λ. Inside the support
    it has a complex-conjugate pair of roots and ρ(λ) = |Im ψ| / (πλ) (since the Cauchy
    transform is G(λ) = (1 + ψ(1/λ))/λ and ρ = −Im G(λ + i0)/π).
    """
    lam = torch.as_tensor(x, dtype=torch.float64)
    flat = lam.reshape(-1).numpy()
    out = np.zeros_like(flat)
    lo, hi = _product_edges(_key(gamma))
    inside = (flat > lo) & (flat < hi)
    if np.any(inside):
        u = 1.0 / flat[inside]
        g = gamma
        coef = np.stack([u * g * g, u * (g * g + 2 * g), u * (1 + 2 * g) - 1, u], axis=-1)  # (n, 4)
        roots = _cubic_roots(coef)
        out[inside] = np.abs(roots.imag).max(axis=-1) / (math.pi * flat[inside])
    return torch.from_numpy(out).reshape(lam.shape)


@lru_cache(maxsize=64)
def _product_table(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(λ grid, CDF) of MP_γ ⊠ MP_γ on its support."""
    return _tabulate(lambda lam: product_density(torch.from_numpy(lam), gamma).numpy(), *_product_edges(gamma))


def product_cdf(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Distribution function of MP_γ ⊠ MP_γ (mean 1), by integrating `product_density`."""
    lam, cdf = _product_table(_key(gamma))
    return _interp(torch.as_tensor(x, dtype=torch.float64), lam, cdf)


# ---------------------------------------------------------------------- BBP (docs/methods.md §4)


def bbp_additive_threshold(gamma: float) -> float:
    """Smallest θ giving a singular-value outlier of θuvᵀ + G/√N: θ_c = γ^{1/4}.

    Benaych-Georges & Nadakuditi 2012; docs/methods.md §4 (WeightWatcher's `spike_min`).
    """
    return gamma**0.25


def bbp_additive_location(theta: float, gamma: float) -> float:
    """Outlier singular value √((1 + θ²)(γ + θ²))/θ for θ > γ^{1/4}, else the edge 1 + √γ.

    Benaych-Georges & Nadakuditi 2012; docs/methods.md §4. Its square is the outlier eigenvalue of
    XᵀX (units where the MP edge is (1 + √γ)²).
    """
    if theta <= bbp_additive_threshold(gamma):
        return 1.0 + math.sqrt(gamma)
    return math.sqrt((1 + theta**2) * (gamma + theta**2)) / theta


def bbp_spiked_threshold(gamma: float) -> float:
    """Spiked covariance diag(ℓ, 1, …): an outlier iff ℓ > 1 + √γ (Baik, Ben Arous & Péché 2005)."""
    return 1.0 + math.sqrt(gamma)


def bbp_spiked_location(ell: float, gamma: float) -> float:
    """Top sample eigenvalue ℓ(1 + γ/(ℓ − 1)) above threshold, else (1 + √γ)² (Baik & Silverstein 2006)."""
    if ell <= bbp_spiked_threshold(gamma):
        return (1.0 + math.sqrt(gamma)) ** 2
    return ell * (1.0 + gamma / (ell - 1.0))


def mp_stieltjes(z: float, gamma: float) -> float:
    """G(z) = ∫ dMP_γ(t)/(z − t) for real z > λ₊ (mean-1 MP):
    (z − 1 + γ − √((z − λ₊)(z − λ₋)))/(2γz)."""
    lo, hi = mp_edges(gamma)
    return (z - 1 + gamma - math.sqrt((z - hi) * (z - lo))) / (2 * gamma * z)


def product_spike_map(ell: float, gamma: float) -> float:
    """Where a factor-Gram outlier ℓ lands in the product ESD (normalised, mean-1 units) [I].

    Model: A = σ_A(G_A + θ√N u aᵀ), B = σ_B G_B (N×M, unit u, a). The nonzero eigenvalues of the
    normalised A Bᵀ B Aᵀ are those of W_A^{1/2} W_B W_A^{1/2}, W = XᵀX/N: a sample covariance with
    N samples of population covariance W_A, whose spectrum is an MP_γ bulk plus the outlier
    ℓ = (1 + θ²)(γ + θ²)/θ² (`bbp_additive_location`²). For a spike in a general population bulk H
    (Bai & Yao 2012, "On sample eigenvalues in a generalized spiked population model", Thm 4.1)
    the outlier sits at ψ(ℓ) = ℓ + γℓ ∫ t/(ℓ − t) dH(t) = ℓ + γℓ(ℓ G_H(ℓ) − 1), and exists iff
    ψ′(ℓ) > 0. With H = MP_γ, min_ℓ ψ(ℓ) equals the product edge (checked in the tests).
    """
    g = mp_stieltjes(ell, gamma)
    return ell + gamma * ell * (ell * g - 1.0)


def product_spike_threshold(gamma: float) -> tuple[float, float]:
    """(ℓ*, θ*): the smallest factor-Gram outlier ℓ* and factor signal θ* that produce an
    outlier in the product ESD, for the single-factor plant of `product_spike_map` [I].

    ℓ* = argmin_{ℓ > (1 + √γ)²} ψ(ℓ) (where ψ′ = 0); θ*² is the larger root of
    t² + (1 + γ − ℓ*)t + γ = 0, i.e. (1 + θ²)(γ + θ²)/θ² = ℓ*. θ* exceeds the factor's own BBP
    threshold γ^{1/4}: a factor spike must be stronger to show in the product than in the factor.
    """
    _, hi = mp_edges(gamma)
    ell = _golden(lambda t: product_spike_map(t, gamma), hi * (1 + 1e-12), hi * 50 + 10, minimise=True)[0]
    b = 1 + gamma - ell
    t = (-b + math.sqrt(b * b - 4 * gamma)) / 2
    return ell, math.sqrt(t)


# ------------------------------------------------------- robust σ² (docs/methods.md §2, "never Frobenius")


def robust_mp_sigma2(eigs: torch.Tensor, n: int, m: int, iters: int = 8) -> torch.Tensor:
    """Spike-robust MP variance σ̂² of each row of `eigs` (..., k): eigenvalues of XᵀX/n, X n×m.

    docs/methods.md §2. Two steps, both immune to a minority of spikes:
    1. quantile matching: σ₀² = median(eigs)/median(MP_γ), γ = m/n (a spike moves the
       empirical median by at most half an eigenvalue spacing);
    2. trimmed moment, iterated: σ² ← mean{λ_i ≤ σ²·t}, t = Johnstone's 99% TW₁ threshold
       (`mp_tw_threshold`), because the MP mean is σ² and, under the null, essentially no bulk
       eigenvalue lies above t, so trimming removes spikes without biasing the bulk.
    Never the Frobenius mean, which a spike inflates. NaN rows give NaN; all-zero rows give 0.
    The null calibration (analysis/spectral/nulls.py) applies this same estimator to its draws, so its
    small finite-size bias is part of the calibrated statistic.
    """
    gamma = min(m, n) / max(m, n)
    x = torch.as_tensor(eigs)
    med_mp = mp_quantile(0.5, gamma)
    sigma2 = torch.nanquantile(x.double(), 0.5, dim=-1) / med_mp
    t = mp_tw_threshold(max(m, n), min(m, n), 0.01)
    xd = x.double()
    for _ in range(iters):
        keep = xd <= sigma2[..., None] * t
        cnt = keep.sum(-1).clamp_min(1)
        sigma2 = torch.where(keep, xd, torch.zeros_like(xd)).sum(-1) / cnt
    bad = ~torch.isfinite(xd).all(-1)
    return torch.where(bad, torch.full_like(sigma2, float("nan")), sigma2).to(x.dtype)


# ---------------------------------------------------------------------------- helpers


def _check_gamma(gamma: float) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"aspect ratio γ = M/N must be in (0, 1], got {gamma}")


def _key(gamma: float) -> float:
    """Round γ so float noise does not defeat the per-γ caches."""
    return round(float(gamma), 12)


def _tabulate(density: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(λ grid, CDF) of a density supported on [lo, hi] with integrable edge singularities.

    Substitution λ = lo + (hi − lo)·w(θ), w = ((1 − cos θ)/2)^p, θ ∈ [0, π]: p = 1 turns the
    square-root edges into smooth integrands; p = 3 when lo = 0 also tames the λ^{-1/2}
    (MP, γ = 1) and λ^{-2/3} (product, γ = 1) poles at zero.
    """
    p = 3 if lo <= 0.0 else 1
    theta = np.linspace(0.0, math.pi, _GRID)
    base = (1 - np.cos(theta)) / 2
    lam = lo + (hi - lo) * base**p
    dlam = (hi - lo) * p * base ** (p - 1) * np.sin(theta) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = np.nan_to_num(density(lam) * dlam)
    cdf = _cumtrapz(integrand, theta)
    return lam, cdf / cdf[-1]


def _cumtrapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(y)
    out[1:] = np.cumsum((y[1:] + y[:-1]) * np.diff(x) / 2)
    return out


def _interp(x: torch.Tensor, xp: np.ndarray, fp: np.ndarray) -> torch.Tensor:
    """np.interp on a tensor (clamped at the ends), NaN preserved."""
    xs = x.detach().cpu().numpy()
    out = np.interp(xs, xp, fp, left=fp[0], right=fp[-1])
    return torch.from_numpy(np.asarray(np.where(np.isnan(xs), np.nan, out))).reshape(x.shape)


def _golden(
    f: Callable[[float], float], a: float, b: float, minimise: bool, tol: float = 1e-13, iters: int = 400
) -> tuple[float, float]:
    """(argument, value) of the extremum of a unimodal f on [a, b] by golden-section search
    (on a log scale when a > 0)."""
    logscale = a > 0
    lo, hi = (math.log(a), math.log(b)) if logscale else (a, b)
    sign = 1.0 if minimise else -1.0

    def g(t: float) -> float:
        return sign * f(math.exp(t) if logscale else t)

    inv = (math.sqrt(5) - 1) / 2
    c, d = hi - inv * (hi - lo), lo + inv * (hi - lo)
    gc, gd = g(c), g(d)
    for _ in range(iters):
        if gc < gd:
            hi, d, gd = d, c, gc
            c = hi - inv * (hi - lo)
            gc = g(c)
        else:
            lo, c, gc = c, d, gd
            d = lo + inv * (hi - lo)
            gd = g(d)
        if hi - lo < tol:
            break
    t = (lo + hi) / 2
    z = math.exp(t) if logscale else t
    return z, f(z)


def _cubic_roots(coef: np.ndarray) -> np.ndarray:
    """Roots of a₀x³ + a₁x² + a₂x + a₃ for each row of coef (n, 4), via companion eigenvalues."""
    a = coef / coef[:, :1]
    n = a.shape[0]
    comp = np.zeros((n, 3, 3))
    comp[:, 0, :] = -a[:, 1:]
    comp[:, 1, 0] = 1.0
    comp[:, 2, 1] = 1.0
    return np.linalg.eigvals(comp)
