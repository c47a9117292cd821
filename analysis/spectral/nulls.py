"""Null models for a head's top normalised eigenvalue, behind one registry, `NULLS`.

The statistic is λ_max of the normalised ESD λ_i = s_i²/(d² σ̂_A² σ̂_B²) of A Bᵀ (analysis/spectral/esd.py).
Each null gives, per head: the bulk edge, the fitted variance, a decision threshold for λ_max
at a false-alarm level α, a p-value, a TW-standardised score and the null CDF at every
eigenvalue (for the KS distance). A `NullModel` entry names its test, its density for plot
overlays (None where the null law is per head) and whether it is Monte-Carlo calibrated.

- "mp": Marchenko-Pastur with γ = r/d fitted to the product ESD itself, Johnstone-TW margin.
  Right for a single Gaussian factor, wrong for a product (docs/methods.md §5): kept to measure
  its false alarms.
- "product": the law of the product of two independent Gaussian factors, MP_γ ⊠ MP_γ
  (docs/methods.md §5), calibrated by Monte Carlo for each shape (d, r) (analysis/spectral/calibration.py),
  p-values from a TW₁ tail model of the draws (analysis/spectral/tail.py).
- "shuffle": the product null refitted, per layer, to WeightWatcher-style element shuffles of the
  actual factors (docs/methods.md §5), for heavy-tailed entries.
- "rotation": the factors' own spectra with a random relative orientation; exact at
  initialisation for every variant, MLA's composed factors included (see `rotation_null`).

`exact_null` names, per attention variant, the null that is exact at initialisation.
"""

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from analysis.spectral.calibration import Calibration
from analysis.spectral.esd import HeadESD, head_esd
from analysis.spectral.rmt import (
    mp_cdf,
    mp_density,
    mp_edges,
    product_cdf,
    product_density,
    product_edge,
    robust_mp_sigma2,
)
from analysis.spectral.tail import TAIL_POWER, TailFit
from analysis.spectral.tracy_widom import johnstone_center_scale, tw1_quantile, tw1_sf


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


_HAAR: dict[tuple[int, int, int], torch.Tensor] = {}


def haar_orthogonal(r: int, draws: int, seed: int) -> torch.Tensor:
    """(draws, r, r) Haar-distributed orthogonal matrices, float64, cached (Mezzadri 2007)."""
    key = (r, draws, seed)
    if key not in _HAAR:
        rng = np.random.default_rng([seed, r, draws, 0x0707])
        Q, R = torch.linalg.qr(torch.from_numpy(rng.standard_normal((draws, r, r))))
        _HAAR[key] = Q * torch.sign(R.diagonal(dim1=-2, dim2=-1))[:, None, :]
    return _HAAR[key]


def rotation_draws(
    left_sv: torch.Tensor, right_sv: torch.Tensor, scale: torch.Tensor, Qh: torch.Tensor, chunk: int = 1600
) -> tuple[torch.Tensor, torch.Tensor]:
    """Null draws of the normalised ESD of D_A O D_B / √scale for each head.

    left_sv, right_sv: (N, r) factor singular values; scale: (N,) normaliser d² σ̂_A² σ̂_B²;
    Qh: (R, r, r) the Haar draws O. Returns (λ_max draws (N, R), pooled sorted eigenvalue draws (N, R·r)), float64.
    Heads with non-finite inputs give NaN rows.
    """
    N, r = left_sv.shape
    R = Qh.shape[0]
    ok = torch.isfinite(left_sv).all(-1) & torch.isfinite(right_sv).all(-1) & torch.isfinite(scale)
    a = torch.where(ok[:, None], left_sv.double(), 1.0)
    b = torch.where(ok[:, None], right_sv.double(), 1.0)
    step = max(1, chunk // R)
    tops, pooled = [], []
    for s in range(0, N, step):
        M = a[s : s + step, None, :, None] * Qh[None] * b[s : s + step, None, None, :]  # (n, R, r, r)
        ev = torch.linalg.eigvalsh(M.mT @ M)  # (n, R, r) ascending: squared singular values
        tops.append(ev[..., -1])
        pooled.append(torch.sort(ev.reshape(ev.shape[0], R * r), dim=-1).values)
    scale_ok = torch.where(ok, scale.double(), math.nan)[:, None]
    return torch.cat(tops) / scale_ok, torch.cat(pooled) / scale_ok


def rotation_null(
    esd: HeadESD, level: float, draws: int = 200, seed: int = 0, calibration: str = "tw"
) -> NullResult:
    """The "rotation" null: each factor keeps its own spectrum, their orientations are unrelated [I].

    With A = U_A D_A V_Aᵀ and B = U_B D_B V_Bᵀ (d×r, r×r orthogonal V), A Bᵀ = U_A D_A (V_Aᵀ V_B) D_B U_Bᵀ,
    so the singular values of A Bᵀ are those of D_A O D_B with O = V_Aᵀ V_B ∈ O(r): they depend only
    on the two factor spectra and on how the query and key bases line up in head space. If either
    factor's law is invariant under A → A Q (Q orthogonal) — i.i.d. Gaussian factors, and also
    MLA's composed factors W_Dᵀ diag(g) W_Uᵀ with a Gaussian up-projection — then O is Haar
    distributed and independent of (D_A, D_B). The null "O is Haar given the observed D_A, D_B" is
    therefore exact at initialisation for every variant, whatever the factor spectra look like,
    and what it detects is alignment of the query and key head-space bases (a learned bilinear
    feature), not spikes of one factor alone (those are tested on the factors themselves,
    `SpectralReport.factors`). The product null instead assumes MP factor spectra and flags nearly
    every MLA head at initialisation (docs/methods.md §5).

    Per head, R Haar matrices (Mezzadri 2007: QR of a Gaussian matrix with the signs of R's diagonal
    moved into Q; the same R draws for every head, cached per (r, R, seed)) give R draws of the
    normalised ESD of D_A O D_B, in the same units as the observed one. The p-value is the TW₁ tail
    model of analysis/spectral/tail.py fitted to that head's draws (exact Monte-Carlo p-value
    alongside), the edge is the median of the drawn λ_max, and the KS null CDF is the pooled drawn
    ESD. Cost: R eigenproblems of size r per head (scripts/bench_spectral.py measures it).

    sigma2 = σ̂_A² σ̂_B².
    """
    if calibration not in ("tw", "empirical"):
        raise ValueError(f"calibration={calibration!r}; allowed: 'tw', 'empirical'")
    d, r = esd.d, esd.r
    sigma2 = (esd.sigma2_left * esd.sigma2_right).double().cpu()
    Qh = haar_orthogonal(r, draws, seed)
    top, pooled = rotation_draws(esd.spectra.left_sv.cpu(), esd.spectra.right_sv.cpu(), d * d * sigma2, Qh)
    y = -top.clamp_min(0).pow(-0.5)
    fit = TailFit(y.mean(-1), y.std(-1))
    lam = esd.eigs[:, 0].double().cpu()
    z = fit.z(lam)
    sorted_top = torch.sort(top, dim=-1).values
    above = draws - torch.searchsorted(sorted_top, lam[:, None].contiguous()).squeeze(-1)
    p_mc = (1.0 + above.double()) / (draws + 1.0)
    if calibration == "tw":
        p, thr = tw1_sf(z), fit.threshold(level)
    else:
        c = math.floor(level * (draws + 1) + 1e-9) - 1
        thr = sorted_top[:, draws - 1 - c] if c >= 0 else torch.full_like(lam, math.inf)
        p = p_mc
    eigs = esd.eigs.double().cpu().contiguous()
    cdf = torch.searchsorted(pooled.contiguous(), eigs, right=True).double() / pooled.shape[-1]
    bad = torch.isnan(lam) | torch.isnan(top).any(-1)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return NullResult(
        edge=torch.where(bad, nan, top.median(-1).values),
        threshold=torch.where(bad, nan, thr),
        sigma2=sigma2,
        pvalue=torch.where(bad, nan, p),
        tw_z=torch.where(bad, nan, z),
        pvalue_mc=torch.where(bad, nan, p_mc),
        null_cdf=torch.where(bad[:, None], nan, cdf),
    )


@dataclass(frozen=True)
class NullInputs:
    """What a null's test may read beyond the ESD: the factors themselves, per layer, and the settings.

    Attributes:
        level: per-head false-alarm level α of the threshold.
        calibration: "tw" (TW₁ tail model of the draws) or "empirical" (exact Monte-Carlo test).
        cal: the Gaussian calibration of this shape (None for a null that is not Monte-Carlo calibrated).
        lefts, rights: the (H, d, r) factors of every layer ("shuffle" permutes them).
        seed, dtype: of the shuffles and Haar draws, and of the shuffled spectra.
        shuffle_replicas: permutations per head ("shuffle"); rotation_draws: Haar draws per head ("rotation").
    """

    level: float
    calibration: str
    cal: Calibration | None
    lefts: list[torch.Tensor]
    rights: list[torch.Tensor]
    seed: int = 0
    dtype: torch.dtype = torch.float32
    shuffle_replicas: int = 8
    rotation_draws: int = 200


@dataclass(frozen=True)
class NullModel:
    """One entry of the registry.

    Attributes:
        name: the value of `spectral.null_model`.
        test: the per-head decision for every head of an ESD.
        density: the null density of the normalised ESD on a grid at aspect ratio γ = r/d (plot
            overlays); None when the null law depends on each head's own factor spectra.
        monte_carlo: whether the null (and the factor tests beside it) use the Monte-Carlo
            calibration of the Gaussian factors; False only for the textbook "mp" baseline.
    """

    name: str
    test: Callable[[HeadESD, NullInputs], NullResult]
    density: Callable[[torch.Tensor, float], torch.Tensor] | None
    monte_carlo: bool


NULLS: dict[str, NullModel] = {
    m.name: m
    for m in (
        NullModel("mp", lambda esd, x: mp_null(esd, x.level), mp_density, monte_carlo=False),
        NullModel("product", lambda esd, x: product_null(esd, x.level, x.cal, x.calibration), product_density,
                  monte_carlo=True),
        NullModel("shuffle", lambda esd, x: shuffle_null(
            esd, x.level, x.cal, torch.cat(x.lefts), torch.cat(x.rights), x.shuffle_replicas, x.seed, x.dtype,
            groups=len(x.lefts)), product_density, monte_carlo=True),
        NullModel("rotation", lambda esd, x: rotation_null(esd, x.level, x.rotation_draws, x.seed, x.calibration),
                  None, monte_carlo=True),
    )
}
NULL_NAMES = tuple(NULLS)


def exact_null(composed_factors: bool) -> str:
    """The null that is exact at initialisation for a variant's QK factors: "rotation" for composed
    factors (the MLA family's W_Dᵀ diag(g) W_Uᵀ, whose spectra are not MP), else "product"."""
    return "rotation" if composed_factors else "product"
