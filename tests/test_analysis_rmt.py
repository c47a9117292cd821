"""RMT formulas (analysis/spectral/: rmt.py, tracy_widom.py) against their definitions and simulation."""

import math

import numpy as np
import pytest
import torch

from analysis.spectral import rmt
from analysis.spectral.calibration import bartlett_triangular
from analysis.spectral.spectra import lapack_threads
from analysis.spectral.tracy_widom import johnstone_center_scale, tw1_cdf, tw1_moments, tw1_quantile, tw1_sf


@pytest.fixture(autouse=True)
def _one_lapack_thread():
    with lapack_threads(1):
        yield


def _integrate(f, lo: float, hi: float, n: int = 100_001) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    return x, f(x)


# ------------------------------------------------------------------ Marchenko-Pastur


@pytest.mark.parametrize("gamma", [0.125, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("sigma2", [1.0, 0.7])
def test_mp_density_normalised_mean_variance_edges(gamma, sigma2):
    lo, hi = rmt.mp_edges(gamma, sigma2)
    assert lo == pytest.approx(sigma2 * (1 - math.sqrt(gamma)) ** 2)
    assert hi == pytest.approx(sigma2 * (1 + math.sqrt(gamma)) ** 2)
    x, p = _integrate(lambda t: rmt.mp_density(t, gamma, sigma2), lo, hi)
    mass = torch.trapezoid(p, x).item()
    mean = torch.trapezoid(p * x, x).item()
    var = torch.trapezoid(p * (x - mean) ** 2, x).item()
    assert mass == pytest.approx(1.0, abs=2e-4)
    assert mean == pytest.approx(sigma2, rel=2e-4)
    assert var == pytest.approx(gamma * sigma2**2, rel=2e-3)
    outside = torch.tensor([lo * 0.99, hi * 1.01, -1.0], dtype=torch.float64)
    assert (rmt.mp_density(outside, gamma, sigma2) == 0).all()
    assert (rmt.mp_density(x[1:-1:1000], gamma, sigma2) > 0).all()


def test_mp_cdf_and_quantile_are_inverse():
    for gamma in (0.125, 0.5, 1.0):
        for p in (0.1, 0.5, 0.9):
            q = rmt.mp_quantile(p, gamma, 2.0)
            assert rmt.mp_cdf(torch.tensor(q), gamma, 2.0).item() == pytest.approx(p, abs=1e-4)
    lo, hi = rmt.mp_edges(0.25)
    assert rmt.mp_cdf(torch.tensor([lo - 0.1, hi + 0.1]), 0.25).tolist() == [0.0, 1.0]


def test_mp_edges_match_simulation():
    """docs/methods.md §2: N = 2000, M = 500, σ² = 0.7 -> edges 0.175, 1.575 (observed 0.179, 1.549)."""
    g = torch.Generator().manual_seed(0)
    N, M, s2 = 2000, 500, 0.7
    X = torch.randn(N, M, generator=g, dtype=torch.float64) * math.sqrt(s2)
    ev = torch.linalg.eigvalsh(X.T @ X / N)
    lo, hi = rmt.mp_edges(M / N, s2)
    assert (lo, hi) == pytest.approx((0.175, 1.575))
    assert ev.min().item() == pytest.approx(lo, rel=0.05)
    assert ev.max().item() == pytest.approx(hi, rel=0.03)


# ------------------------------------------------------------------ product law


@pytest.mark.parametrize(("gamma", "edge"), [(0.125, 2.334), (0.25, 3.098), (0.5, 4.409), (1.0, 6.75)])
def test_product_edge_values(gamma, edge):
    assert rmt.product_edge(gamma) == pytest.approx(edge, abs=1e-3)
    z = np.linspace(1e-3, 50, 200_001)
    assert rmt.product_edge(gamma) == pytest.approx(((1 + z) * (1 + gamma * z) ** 2 / z).min(), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.125, 0.25, 0.5])
def test_product_density_normalised_mean_variance(gamma):
    lo, hi = rmt._product_edges(gamma)
    x, p = _integrate(lambda t: rmt.product_density(t, gamma), lo, hi)
    assert torch.trapezoid(p, x).item() == pytest.approx(1.0, abs=1e-3)
    assert torch.trapezoid(p * x, x).item() == pytest.approx(1.0, abs=1e-3)
    # free multiplicative convolution of two mean-1 laws: variances add, γ + γ
    assert torch.trapezoid(p * (x - 1) ** 2, x).item() == pytest.approx(2 * gamma, rel=2e-3)


def test_product_law_matches_simulated_esd():
    """Pooled normalised ESD of Gaussian products vs the MP_γ ⊠ MP_γ CDF (d = 512, r = 64)."""
    g = torch.Generator().manual_seed(1)
    d, r = 512, 64
    A = torch.randn(20, d, r, generator=g, dtype=torch.float64)
    B = torch.randn(20, d, r, generator=g, dtype=torch.float64)
    lam = (torch.linalg.svdvals(A @ B.mT)[:, :r] ** 2 / d**2).flatten()
    lam, _ = torch.sort(lam)
    F = rmt.product_cdf(lam, r / d)
    n = lam.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - F, F - (i - 1) / n).max().item()
    assert ks < 0.03


def test_product_edge_vs_simulation_finite_size():
    """docs/methods.md §5: d = 512, r = 64 -> median top normalised eigenvalue 2.24, theory 2.334."""
    rng = np.random.default_rng(0)
    d, r, n = 512, 64, 400
    _, GA = bartlett_triangular(n, d, r, rng)  # the Gram of a Gaussian d×r factor, exactly
    RB, _ = bartlett_triangular(n, d, r, rng)
    K = RB @ GA @ RB.mT
    top = torch.linalg.eigvalsh((K + K.mT) / 2)[:, -1] / d**2
    med = top.median().item()
    print(f"d=512 r=64: median λ_max {med:.3f}, 99% {top.quantile(0.99).item():.3f}, theory edge 2.334")
    assert med == pytest.approx(2.24, abs=0.04)
    assert med < rmt.product_edge(r / d) < top.quantile(0.999).item() + 0.1


# ------------------------------------------------------------------ BBP


def test_bbp_formulas():
    assert rmt.bbp_additive_threshold(0.25) == pytest.approx(0.7071, abs=1e-4)
    assert rmt.bbp_additive_location(0.5, 0.25) == pytest.approx(1.5)  # below threshold: the edge
    assert rmt.bbp_additive_location(1.0, 0.25) == pytest.approx(math.sqrt(2 * 1.25))
    assert rmt.bbp_additive_location(1.5, 0.25) == pytest.approx(1.900, abs=1e-3)
    assert rmt.bbp_spiked_threshold(0.25) == pytest.approx(1.5)
    assert rmt.bbp_spiked_location(3.0, 0.25) == pytest.approx(3 * (1 + 0.25 / 2))
    assert rmt.bbp_spiked_location(1.2, 0.25) == pytest.approx(2.25)


def test_bbp_additive_location_matches_simulation():
    """docs/methods.md §4: N = 4000, M = 1000 (here 2000 × 500), θ = 1.5 -> 1.900."""
    g = torch.Generator().manual_seed(2)
    N, M, theta = 2000, 500, 1.5
    u = torch.randn(N, 1, generator=g, dtype=torch.float64)
    v = torch.randn(M, 1, generator=g, dtype=torch.float64)
    X = theta * (u / u.norm()) @ (v / v.norm()).T + torch.randn(N, M, generator=g, dtype=torch.float64) / math.sqrt(N)
    top = torch.linalg.svdvals(X)[0].item()
    assert top == pytest.approx(rmt.bbp_additive_location(theta, M / N), rel=0.01)


def test_product_spike_map_minimum_is_the_product_edge():
    """Bai-Yao map ψ(ℓ) for a spike in one factor: min ψ = MP ⊠ MP edge (consistency of the derivation)."""
    for gamma in (0.125, 0.25, 0.5):
        ell, theta = rmt.product_spike_threshold(gamma)
        assert rmt.product_spike_map(ell, gamma) == pytest.approx(rmt.product_edge(gamma), rel=1e-9)
        assert ell > rmt.mp_edges(gamma)[1]
        assert theta > rmt.bbp_additive_threshold(gamma)
        assert (1 + theta**2) * (gamma + theta**2) / theta**2 == pytest.approx(ell)
    # a spiked population with an identity bulk (H = δ₁) reduces to Baik-Silverstein: checked via
    # the MP Stieltjes transform's large-z limit G(z) ≈ 1/z + 1/z²
    assert rmt.mp_stieltjes(1e6, 0.25) == pytest.approx(1e-6 + 1e-12, rel=1e-6)


# ------------------------------------------------------------------ robust σ²


def test_robust_sigma2_recovers_variance_and_ignores_spikes():
    g = torch.Generator().manual_seed(3)
    n, d, r, s2 = 200, 256, 32, 0.3
    X = torch.randn(n, d, r, generator=g, dtype=torch.float64) * math.sqrt(s2)
    ev = torch.linalg.eigvalsh(X.mT @ X / d)
    assert rmt.robust_mp_sigma2(ev, d, r).mean().item() == pytest.approx(s2, rel=0.01)
    # two strong additive spikes X + Σ θ_k √(d σ²) u_k a_kᵀ (orthonormal u, a), θ = 2 and 4
    u = torch.linalg.qr(torch.randn(n, d, 2, generator=g, dtype=torch.float64))[0]
    a = torch.linalg.qr(torch.randn(n, r, 2, generator=g, dtype=torch.float64))[0]
    theta = torch.tensor([2.0, 4.0], dtype=torch.float64)
    Xs = X + math.sqrt(d * s2) * (u * theta) @ a.mT
    spiked = torch.linalg.eigvalsh(Xs.mT @ Xs / d)
    frob = spiked.mean(-1)
    rob = rmt.robust_mp_sigma2(spiked, d, r)
    assert frob.mean().item() > 1.5 * s2  # the Frobenius mean is inflated by 20/32
    assert rob.mean().item() == pytest.approx(s2, rel=0.03)  # the robust one is not
    nan_row = torch.full((1, r), float("nan"), dtype=torch.float64)
    assert torch.isnan(rmt.robust_mp_sigma2(nan_row, d, r)).all()


# ------------------------------------------------------------------ Tracy-Widom


def test_tw1_constants():
    mean, sd = tw1_moments()
    assert mean == pytest.approx(-1.2065, abs=2e-4)
    assert sd == pytest.approx(1.2680, abs=2e-4)
    for p, q in ((0.90, 0.4501), (0.95, 0.9793), (0.99, 2.0234)):  # docs/methods.md §3: 0.45, 0.98, 2.02
        assert tw1_quantile(p) == pytest.approx(q, abs=2e-3)
        assert tw1_cdf(q).item() == pytest.approx(p, abs=2e-4)
    s = torch.tensor([-3.0, 0.0, 2.0, 5.0, 10.0, 20.0])
    torch.testing.assert_close(tw1_cdf(s) + tw1_sf(s), torch.ones(6, dtype=torch.float64))
    sf = tw1_sf(torch.linspace(-5, 30, 200))
    assert (sf[1:] <= sf[:-1]).all() and sf[-1] > 0
    assert torch.isnan(tw1_sf(torch.tensor([float("nan")]))).all()


def test_johnstone_tw_approximation_and_n_to_the_minus_two_thirds_scaling():
    """sd(λ_max) of S = XᵀX/N shrinks like N^{-2/3} at fixed γ (docs/methods.md §3); the TW-standardised
    mean and sd match TW₁'s within loose finite-size tolerances."""
    rng = np.random.default_rng(4)
    sds = {}
    for N in (48, 384):
        M = N // 4
        _, G = bartlett_triangular(600, N, M, rng)
        top = torch.linalg.eigvalsh(G)[:, -1] / N
        mu, s = johnstone_center_scale(N, M)
        z = (top - mu) / s
        assert z.mean().item() == pytest.approx(-1.21, abs=0.2)
        assert z.std().item() == pytest.approx(1.27, rel=0.15)
        sds[N] = top.std().item()
    ratio = sds[48] / sds[384]
    print(f"sd ratio N=48 vs 384: {ratio:.2f} (N^(-2/3) predicts {8 ** (2 / 3):.2f})")
    assert 3.0 < ratio < 5.3
