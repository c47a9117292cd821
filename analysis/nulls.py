"""Null models for a head's top normalised eigenvalue: "mp", "product" (default), "shuffle".

The statistic is λ_max of the normalised ESD λ_i = s_i²/(d² σ̂_A² σ̂_B²) of A Bᵀ (analysis/esd.py).
Each null gives, per head: the bulk edge, the fitted variance, a decision threshold for λ_max
at a false-alarm level α, a p-value, a TW-standardised score and the null CDF at every
eigenvalue (for the KS distance).

- "mp": Marchenko-Pastur with γ = r/d fitted to the product ESD itself, Johnstone-TW margin.
  Right for a single Gaussian factor, wrong for a product (docs/methods.md §5): kept to measure
  its false alarms.
- "product": the law of the product of two independent Gaussian factors, MP_γ ⊠ MP_γ
  (docs/methods.md §5), calibrated by Monte Carlo for each shape (d, r) (analysis/calibration.py),
  p-values from a TW₁ tail model of the draws (analysis/tail.py).
- "shuffle": the product null refitted, per layer, to WeightWatcher-style element shuffles of the
  actual factors (docs/methods.md §5), for heavy-tailed entries.
- "rotation" (analysis/rotation.py): the factors' own spectra with a random relative orientation;
  exact at initialisation for every variant, MLA's composed factors included.
"""

import hashlib
import math
from dataclasses import dataclass

import torch

from analysis.calibration import Calibration
from analysis.esd import HeadESD, head_esd
from analysis.rmt import mp_cdf, mp_edges, product_cdf, product_edge, robust_mp_sigma2
from analysis.tail import TAIL_POWER, TailFit
from analysis.tracy_widom import johnstone_center_scale, tw1_quantile, tw1_sf

NULL_NAMES = ("mp", "product", "shuffle", "rotation")  # "rotation": analysis/rotation.py


@dataclass
class NullResult:
    """Per-head decision quantities, float64, shape (N,) unless stated; units of the normalised ESD.

    Attributes:
        edge: bulk edge of the null.
        threshold: λ_max decision threshold at the false-alarm level.
        sigma2: fitted variance (product/shuffle: σ̂_A² σ̂_B²; mp: σ² of the MP law fitted to s²/d²).
        pvalue: p-value of λ_max under the null (TW₁ tail model).
        tw_z: TW-standardised λ_max, pvalue = 1 − F₁(tw_z).
        pvalue_mc: exact Monte-Carlo p-value (NaN for "mp").
        null_cdf: (N, k) null CDF at each eigenvalue (for the KS distance).
    """

    edge: torch.Tensor
    threshold: torch.Tensor
    sigma2: torch.Tensor
    pvalue: torch.Tensor
    tw_z: torch.Tensor
    pvalue_mc: torch.Tensor
    null_cdf: torch.Tensor


def mp_null(esd: HeadESD, level: float) -> NullResult:
    """The naive MP null applied to a product (docs/methods.md §2-3, §5).

    σ̂² = `robust_mp_sigma2` of the normalised ESD treated as MP(γ = r/d); edge σ̂²(1 + √γ)²;
    tw_z = (λ_max/σ̂² − μ)/s with Johnstone's μ, s for a d×r matrix; p = 1 − F₁(tw_z);
    threshold σ̂²(μ + s·q_TW₁(1 − α)).
    """
    d, r = esd.d, esd.r
    gamma = r / d
    eigs = esd.eigs.double()
    c = robust_mp_sigma2(eigs, d, r)
    mu, s = johnstone_center_scale(d, r)
    z = (eigs[:, 0] / c - mu) / s
    nan = torch.full_like(z, math.nan)
    return NullResult(
        edge=c * mp_edges(gamma)[1],
        threshold=c * (mu + s * tw1_quantile(1.0 - level)),
        sigma2=c * esd.sigma2_left * esd.sigma2_right,
        pvalue=torch.where(torch.isnan(z), nan, tw1_sf(z)),
        tw_z=z,
        pvalue_mc=nan,
        null_cdf=mp_cdf(eigs / c[:, None], gamma),
    )


def product_null(esd: HeadESD, level: float, cal: Calibration, calibration: str = "tw") -> NullResult:
    """The product null MP_γ ⊠ MP_γ, Monte-Carlo calibrated (docs/methods.md §5; module doc).

    Edge: the asymptotic product edge `rmt.product_edge(r/d)` (the finite-size median of λ_max
    is slightly lower, e.g. 1.97 vs 2.04 at d = 768, r = 64). sigma2 = σ̂_A² σ̂_B².
    calibration "tw": TW₁ tail model of the draws; "empirical": exact MC test.
    """
    lam = esd.eigs[:, 0].double()
    fit = cal.fit("product")
    z = fit.z(lam)
    mc = cal.mc_pvalue(lam)
    if calibration == "tw":
        p, thr = tw1_sf(z), fit.threshold(level).expand_as(lam)
    elif calibration == "empirical":
        p, thr = mc, torch.full_like(lam, cal.empirical_threshold(level))
    else:
        raise ValueError(f"calibration={calibration!r}; allowed: 'tw', 'empirical'")
    return NullResult(
        edge=torch.full_like(lam, product_edge(esd.r / esd.d)),
        threshold=thr,
        sigma2=esd.sigma2_left * esd.sigma2_right,
        pvalue=torch.where(torch.isnan(z), z, p),
        tw_z=z,
        pvalue_mc=mc,
        null_cdf=product_cdf(esd.eigs.double(), esd.r / esd.d),
    )


def shuffle_null(
    esd: HeadESD,
    level: float,
    cal: Calibration,
    left: torch.Tensor,
    right: torch.Tensor,
    replicas: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    groups: int = 1,
) -> NullResult:
    """The product null refitted to element-shuffled copies of the actual factors [I].

    WeightWatcher's randomisation (docs/methods.md §5): permuting the entries of A_h and of B_h
    destroys their correlations but keeps the (possibly heavy-tailed) entry distribution, which
    moves the null edge (docs/methods.md §5, "correlation traps"). For `replicas` permutations the
    normalised λ_max of every head is recomputed, and the TW tail model (y = −λ^{−1/2}, see the
    module doc) is refitted per group of heads (`groups` = layers: N = groups × heads, pooling
    heads·replicas draws, since a few replicas per head cannot estimate a spread). The group's
    mean and sd of y are floored at the Gaussian calibration's, so the shuffle null is never
    less conservative than "product"; for Gaussian entries the two coincide up to that floor.
    Edge: the product edge moved by the same location shift. pvalue_mc is the product null's
    at the location-shifted λ_max. Cost: `replicas` extra spectra of every head.
    """
    base = product_null(esd, level, cal)
    N, d, r = left.shape
    # a hashed seed: a generator seeded like the model's init (e.g. both 0) would replay the
    # uniforms behind its weights, and sorting by them plants structure instead of destroying it
    gen = torch.Generator().manual_seed(_derived_seed("shuffle", seed))
    flat_a, flat_b = left.detach().reshape(N, d * r), right.detach().reshape(N, d * r)
    ys = []
    for _ in range(replicas):  # one permutation per replica, applied to every head's own entries
        pa = torch.randperm(d * r, generator=gen).to(left.device)
        pb = torch.randperm(d * r, generator=gen).to(left.device)
        sa, sb = flat_a[:, pa].reshape(N, d, r), flat_b[:, pb].reshape(N, d, r)
        lam = head_esd(sa, sb, dtype=dtype, vectors=False).eigs[:, 0].double().cpu()
        ys.append(-lam.clamp_min(0).pow(TAIL_POWER))
    fit = cal.fit("product")
    y = torch.stack(ys, -1).reshape(groups, -1)  # (groups, heads·replicas)
    finite = torch.isfinite(y)
    cnt = finite.sum(-1).clamp_min(2)
    mean = torch.where(finite, y, 0.0).sum(-1) / cnt
    sd = (torch.where(finite, (y - mean[:, None]) ** 2, 0.0).sum(-1) / (cnt - 1)).sqrt()
    per = N // groups
    mean = mean.clamp_min(fit.mean_y).repeat_interleave(per)  # (N,)
    sd = sd.clamp_min(fit.sd_y).repeat_interleave(per)
    head_fit = TailFit(mean, sd)  # type: ignore[arg-type]
    lam = esd.eigs[:, 0].double()
    z = head_fit.z(lam)
    shift = mean - fit.mean_y
    edge_y = fit.y_of(product_edge(r / d)) + shift
    lam_shifted = (-(fit.y_of(lam) - shift)).clamp_min(1e-300).pow(1.0 / TAIL_POWER)
    return NullResult(
        edge=(-edge_y).clamp_min(1e-300).pow(1.0 / TAIL_POWER),
        threshold=head_fit.threshold(level),
        sigma2=base.sigma2,
        pvalue=torch.where(torch.isnan(z), z, tw1_sf(z)),
        tw_z=z,
        pvalue_mc=cal.mc_pvalue(torch.where(torch.isnan(lam), lam, lam_shifted)),
        null_cdf=base.null_cdf,
    )


def _derived_seed(tag: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"qkscope-{tag}-{seed}".encode()).digest()[:8], "little") >> 1


def factor_test(
    lam_max: torch.Tensor, d: int, r: int, level: float, cal: Calibration | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(p-value, threshold) for a single factor's normalised top eigenvalue s₁²/(d σ̂²).

    With a calibration: the TW tail model of the simulated Gaussian factors (exact statistic,
    estimator included). Without (null "mp"): textbook Johnstone TW at γ = r/d (docs/methods.md §3).
    """
    lam = torch.as_tensor(lam_max, dtype=torch.float64)
    if cal is not None:
        fit = cal.fit("factor")
        p = tw1_sf(fit.z(lam))
        thr = fit.threshold(level).expand_as(lam)
    else:
        mu, s = johnstone_center_scale(d, r)
        p = tw1_sf((lam - mu) / s)
        thr = torch.full_like(lam, mu + s * tw1_quantile(1.0 - level))
    return torch.where(torch.isnan(lam), lam, p), thr
