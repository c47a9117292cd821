"""Null models (analysis/spectral/nulls.py): calibration, cache, false-alarm rates and detection power.

False-alarm tests draw independent Gaussian factors (as at initialisation) and count heads with a
spike at fa_level = 1%; they pass when the rate is ≤ 1% + 3 binomial standard errors, so a null
that is too liberal fails. The shapes are the shipped presets: tiny (d=128, r=32), small (256, 32),
GPT-2-small (768, 64), and MLA-like content (128, 32) and rope (128, 16).
"""

import math

import numpy as np
import pytest
import torch

from analysis.spectral import SpectralAnalyzer, rmt
from analysis.spectral.calibration import NullCalibrator, bartlett_triangular, simulate_null
from analysis.spectral.esd import head_esd
from analysis.spectral.nulls import product_null
from analysis.spectral.spectra import lapack_threads
from analysis.spectral.tail import TailFit
from analysis.spectral.tracy_widom import tw1_sf
from models.probe import QKFactors

LEVEL = 0.01


@pytest.fixture(autouse=True)
def _one_lapack_thread():
    with lapack_threads(1):
        yield


def _gaussian_heads(n: int, d: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, r, generator=g) * 0.02, torch.randn(n, d, r, generator=g) * 0.02


def _spike_rate(left, right, null: str, cache_dir, **kw) -> float:
    an = SpectralAnalyzer(null=null, fa_level=LEVEL, cache_dir=str(cache_dir), **kw)
    h = an.analyze([[QKFactors(left, right)]], layer_sum=False).heads["content"]
    assert h.finite.all()
    return (h.num_spikes > 0).double().mean().item()


def _limit(n: int, level: float = LEVEL) -> float:
    return level + 3 * math.sqrt(level * (1 - level) / n)


# ------------------------------------------------------------------ calibration machinery


def test_bartlett_draws_match_explicit_gaussian_factors():
    """The calibration samples Grams by Bartlett; explicit Gaussian factors give the same law."""
    d, r, n = 64, 16, 1500
    cal = simulate_null(d, r, n, seed=11)
    A, B = _gaussian_heads(n, d, r, seed=12)
    explicit = np.sort(head_esd(A, B, vectors=False).eigs[:, 0].numpy())
    grid = np.concatenate([cal.product, explicit])
    ks = np.abs(np.searchsorted(cal.product, grid, "right") / n - np.searchsorted(explicit, grid, "right") / n).max()
    assert ks < 1.63 * math.sqrt(2 / n)  # two-sample KS at the 1% level
    rng = np.random.default_rng(0)
    R, G = bartlett_triangular(4, 10, 3, rng)
    torch.testing.assert_close(R.mT @ R, G)
    assert (torch.triu(R) == R).all()


def test_calibration_is_cached_in_memory_and_on_disk(tmp_path):
    cal = NullCalibrator(draws=50, seed=123, cache_dir=str(tmp_path))
    first = cal.get(32, 8)
    path = cal.path(32, 8)
    assert path.exists() and first.seconds > 0
    assert cal.get(32, 8) is first  # memory
    from analysis.spectral import calibration

    calibration._MEMORY.clear()
    loaded = NullCalibrator(draws=50, seed=123, cache_dir=str(tmp_path)).get(32, 8)
    assert loaded.seconds == 0.0  # disk
    np.testing.assert_array_equal(loaded.product, first.product)
    np.testing.assert_array_equal(loaded.factor, first.factor)
    other = NullCalibrator(draws=50, seed=124, cache_dir=str(tmp_path)).get(32, 8)
    assert not np.array_equal(other.product, first.product)


def test_corrupt_or_unwritable_cache_only_warns(tmp_path):
    from analysis.spectral import calibration

    cal = NullCalibrator(draws=40, seed=7, cache_dir=str(tmp_path))
    cal.path(16, 4).write_bytes(b"not an npz")
    calibration._MEMORY.clear()
    with pytest.warns(UserWarning, match="unreadable"):
        assert len(cal.get(16, 4).product) == 40
    blocker = tmp_path / "file"
    blocker.write_text("x")
    calibration._MEMORY.clear()
    with pytest.warns(UserWarning, match="could not write"):
        assert len(NullCalibrator(draws=40, seed=7, cache_dir=str(blocker / "sub")).get(16, 4).product) == 40


def test_tail_fit_threshold_and_pvalue_agree():
    cal = simulate_null(64, 16, 400, seed=1)
    fit = cal.fit("product")
    for level in (0.1, 0.01, 0.001):
        thr = fit.threshold(level)
        assert tw1_sf(fit.z(thr)).item() == pytest.approx(level, rel=1e-3)
    assert fit.threshold(0.001) > fit.threshold(0.01) > fit.threshold(0.1) > np.median(cal.product)
    assert isinstance(TailFit.from_draws(cal.product), TailFit)


def test_empirical_threshold_is_the_exact_mc_test():
    cal = simulate_null(64, 16, 299, seed=2)
    t = cal.empirical_threshold(0.01)  # (R + 1)·α = 3: reject iff fewer than 3 draws ≥ λ
    assert t == cal.product[-3]
    lam = torch.tensor([t - 1e-9, t + 1e-9, cal.product[-1] + 1, math.nan])
    p = cal.mc_pvalue(lam)
    assert p[0] > 0.01 >= p[1]
    assert p[2].item() == pytest.approx(1 / 300)
    assert math.isnan(p[3])
    assert cal.empirical_threshold(0.001) == math.inf  # R too small for α = 0.001


# ------------------------------------------------------------------ false alarms


def test_false_alarm_rate_product_vs_mp_tiny(tmp_path):
    """1000 Gaussian heads at the tiny preset shape (d=128, r=32): product ≤ 1%, naive MP ≫ 1%."""
    n = 1000
    A, B = _gaussian_heads(n, 128, 32, seed=100)
    rate = _spike_rate(A, B, "product", tmp_path)
    rate_emp = _spike_rate(A, B, "product", tmp_path, calibration="empirical")
    rate_mp = _spike_rate(A, B, "mp", tmp_path)
    print(f"\nd=128 r=32: false alarms product {rate:.2%} (empirical MC {rate_emp:.2%}), naive mp {rate_mp:.2%}")
    assert rate <= _limit(n)
    assert rate_emp <= _limit(n)
    assert rate_mp > 0.5  # the motivation for the product null: MP flags most heads at init


def test_false_alarm_rate_shuffle_gaussian(tmp_path):
    A, B = _gaussian_heads(400, 128, 32, seed=101)
    rate = _spike_rate(A, B, "shuffle", tmp_path, shuffle_replicas=4)
    assert rate <= _limit(400)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("d", "r", "label"),
    [(128, 32, "tiny / MLA content"), (256, 32, "small"), (768, 64, "GPT-2-small"), (128, 16, "MLA rope")],
)
def test_false_alarm_rate_presets(d, r, label, tmp_path):
    n = 3000
    A, B = _gaussian_heads(n, d, r, seed=200 + d + r)
    rate = _spike_rate(A, B, "product", tmp_path)
    rate_mp = _spike_rate(A, B, "mp", tmp_path)
    print(f"\n{label} d={d} r={r}: false alarms over {n} heads: product {rate:.2%}, naive mp {rate_mp:.2%}")
    assert rate <= _limit(n)
    assert rate_mp > 0.5


@pytest.mark.slow
def test_mla_rope_shared_key_false_alarm(tmp_path):
    """MLA's rope kind shares one key factor across heads: per-head tests stay at level."""
    n_layers, H, d, r = 100, 16, 128, 16
    g = torch.Generator().manual_seed(300)
    layers = []
    for _ in range(n_layers):
        shared = torch.randn(d, r, generator=g)
        layers.append([QKFactors(torch.randn(H, d, r, generator=g), shared.expand(H, d, r).clone(), "rope")])
    h = SpectralAnalyzer(cache_dir=str(tmp_path)).analyze(layers, layer_sum=False).heads["rope"]
    rate = (h.num_spikes > 0).double().mean().item()
    print(f"\nMLA rope with shared key, {n_layers * H} heads: false alarms {rate:.2%}")
    assert rate <= _limit(n_layers * H)


@pytest.mark.slow
def test_shuffle_null_absorbs_heavy_tailed_entries(tmp_path):
    """i.i.d. Student-t(3) entries carry no QK structure; the Gaussian product null flags most
    heads (large single entries act as WeightWatcher's correlation traps), the shuffle null does not."""
    n = 500
    t3 = torch.distributions.StudentT(3.0)
    torch.manual_seed(301)
    A, B = t3.sample((n, 128, 32)), t3.sample((n, 128, 32))
    rate_prod = _spike_rate(A, B, "product", tmp_path)
    rate_shuf = _spike_rate(A, B, "shuffle", tmp_path)
    print(f"\nStudent-t(3) entries: product {rate_prod:.1%}, shuffle {rate_shuf:.1%}")
    assert rate_prod > 0.5
    assert rate_shuf <= 0.03


# ------------------------------------------------------------------ detection power


def _planted(n: int, d: int, r: int, theta: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = G_A + θ√d u aᵀ (unit u ∈ R^d, a ∈ R^r), B = G_B: a rank-1 query feature (rmt.product_spike_map)."""
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(n, d, r, generator=g), torch.randn(n, d, r, generator=g)
    u = torch.randn(n, d, 1, generator=g)
    a = torch.randn(n, 1, r, generator=g)
    return A + theta * math.sqrt(d) * (u / u.norm(dim=1, keepdim=True)) @ (a / a.norm(dim=2, keepdim=True)), B


def _predicted_lambda(theta: float, gamma: float) -> float:
    """Where the planted spike lands in the normalised ESD: ψ(ℓ(θ)), ℓ = (1 + θ²)(γ + θ²)/θ²."""
    return rmt.product_spike_map((1 + theta**2) * (gamma + theta**2) / theta**2, gamma)


def _theta_for(lam: float, gamma: float) -> float:
    """The plant strength θ whose predicted outlier is λ (bisection above the BBP point θ*)."""
    lo, hi = rmt.product_spike_threshold(gamma)[1], 50.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _predicted_lambda(mid, gamma) < lam else (lo, mid)
    return lo


def _detection(d: int, r: int, theta: float, n: int, seed: int, cache_dir) -> tuple[float, float, float]:
    cal = NullCalibrator(cache_dir=str(cache_dir), draws=2000).get(d, r)
    A, B = _planted(n, d, r, theta, seed)
    esd = head_esd(A, B, vectors=False)
    res = product_null(esd, LEVEL, cal)
    det = (esd.eigs[:, 0] > res.threshold).double().mean().item()
    return det, esd.eigs[:, 0].median().item(), res.threshold[0].item()


def test_planted_spike_lands_where_the_derived_bbp_map_says(tmp_path):
    """The derivation in rmt.product_spike_map: a factor spike θ above θ* sits at ψ(ℓ(θ)), and a
    spike predicted exactly at the decision threshold is detected about half the time."""
    d, r = 256, 32
    gamma = r / d
    theta_star = rmt.product_spike_threshold(gamma)[1]
    for mult in (1.5, 2.0):
        _, med, _ = _detection(d, r, mult * theta_star, 400, seed=400, cache_dir=tmp_path)
        assert med == pytest.approx(_predicted_lambda(mult * theta_star, gamma), rel=0.02)
    thr = NullCalibrator(cache_dir=str(tmp_path), draws=2000).get(d, r).fit().threshold(LEVEL).item()
    det, _, _ = _detection(d, r, _theta_for(thr, gamma), 1000, seed=401, cache_dir=tmp_path)
    assert 0.40 < det < 0.60


def test_planted_spike_detected_at_gpt2_small_shape(tmp_path):
    """d = 768, r = 64: a spike at 1.2× the finite-size detection threshold θ_det (the θ whose
    predicted outlier ψ(ℓ(θ)) equals the 1% decision threshold) is detected ≥ 95% of the time.

    At the asymptotic BBP point θ* (outlier iff θ > θ*; `rmt.product_spike_threshold`) the outlier
    leaves the edge quadratically (ψ′ = 0 there), so 1.2·θ* is only 5% above the edge and below
    the finite-size threshold at every shipped shape (test_detection_power_table prints the rates).
    """
    d, r = 768, 64
    gamma = r / d
    theta_star = rmt.product_spike_threshold(gamma)[1]
    thr = NullCalibrator(cache_dir=str(tmp_path), draws=2000).get(d, r).fit().threshold(LEVEL).item()
    theta_det = _theta_for(thr, gamma)
    det, med, _ = _detection(d, r, 1.2 * theta_det, 1000, seed=402, cache_dir=tmp_path)
    print(
        f"\nd=768 r=64: θ*={theta_star:.3f} θ_det={theta_det:.3f}; detection at 1.2θ_det {det:.1%} "
        f"(median λ {med:.3f} vs threshold {thr:.3f}); 1.2θ* is in test_detection_power_table"
    )
    assert det >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize(("d", "r"), [(128, 32), (256, 32), (768, 64), (128, 16)])
def test_detection_power_table(d, r, tmp_path):
    """Power at the asymptotic BBP point and at the finite-size threshold, for the record."""
    gamma = r / d
    theta_star = rmt.product_spike_threshold(gamma)[1]
    thr = NullCalibrator(cache_dir=str(tmp_path), draws=2000).get(d, r).fit().threshold(LEVEL).item()
    theta_det = _theta_for(thr, gamma)
    rows = []
    for label, theta in (
        ("1.2θ*", 1.2 * theta_star),
        ("θ_det", theta_det),
        ("1.2θ_det", 1.2 * theta_det),
        ("1.5θ_det", 1.5 * theta_det),
    ):
        det, _, _ = _detection(d, r, theta, 2000, seed=500 + d + r, cache_dir=tmp_path)
        rows.append(f"{label}={det:.1%}")
    print(f"\nd={d} r={r} θ*={theta_star:.3f} θ_det={theta_det:.3f}: " + ", ".join(rows))
    det15, _, _ = _detection(d, r, 1.5 * theta_det, 2000, seed=600 + d + r, cache_dir=tmp_path)
    assert det15 >= 0.95


# ------------------------------------------------------------------ rotation null (MLA)


def _mla_like(n: int, d: int, r: int, latent: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA at init (V2-Lite, no query compression): A_h = W_Q^hᵀ, B_h = (W_UK^h W_DKV)ᵀ, Gaussian weights."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, r, generator=g)
    B = torch.randn(n, d, latent, generator=g) @ torch.randn(n, latent, r, generator=g)
    return A, B


def test_rotation_null_stays_at_level_for_mla_where_product_does_not(tmp_path):
    """Composed MLA factors are not MP: the product null flags almost every head at init; the
    rotation null (factor spectra kept, orientation randomised) stays at level."""
    n = 400
    A, B = _mla_like(n, 128, 16, 128, seed=700)
    rate_prod = _spike_rate(A, B, "product", tmp_path)
    rate_rot = _spike_rate(A, B, "rotation", tmp_path)
    print(f"\nMLA-like d=128 r=16: false alarms product {rate_prod:.1%}, rotation {rate_rot:.1%}")
    assert rate_prod > 0.5
    assert rate_rot <= _limit(n)


def test_rotation_null_detects_aligned_query_key_feature(tmp_path):
    """A shared latent direction c in both factors (A = G_A + θ√d u cᵀ, B = G_B + θ√d v cᵀ) is a
    bilinear feature u vᵀ: the rotation null flags it; a spike in one factor alone it does not."""
    n, d, r, theta = 200, 128, 16, 1.5
    g = torch.Generator().manual_seed(701)
    A, B = torch.randn(n, d, r, generator=g), torch.randn(n, d, r, generator=g)
    unit = lambda x: x / x.norm(dim=-2, keepdim=True)  # noqa: E731
    u, v = unit(torch.randn(n, d, 1, generator=g)), unit(torch.randn(n, d, 1, generator=g))
    c = unit(torch.randn(n, r, 1, generator=g)).mT
    aligned = _spike_rate(A + theta * math.sqrt(d) * u @ c, B + theta * math.sqrt(d) * v @ c, "rotation", tmp_path)
    one_sided = _spike_rate(A + theta * math.sqrt(d) * u @ c, B, "rotation", tmp_path)
    print(f"\nrotation null: aligned feature detected {aligned:.1%}, single-factor spike flagged {one_sided:.1%}")
    assert aligned >= 0.95
    assert one_sided <= _limit(n)


@pytest.mark.slow
@pytest.mark.parametrize(("d", "r"), [(128, 32), (128, 16), (256, 32)])
def test_rotation_null_false_alarm_gaussian(d, r, tmp_path):
    n = 1500
    A, B = _gaussian_heads(n, d, r, seed=800 + d + r)
    rate = _spike_rate(A, B, "rotation", tmp_path)
    print(f"\nrotation null d={d} r={r}: false alarms {rate:.2%} over {n} Gaussian heads")
    assert rate <= _limit(n)


def test_registry_entries_decide_every_head_and_the_config_picks_the_exact_one(tmp_path):
    """Every NULLS entry decides every head with finite, well-formed results on Gaussian factors, a
    planted spike gets the smallest p-value under each, and `${qk.null_for:...}` picks "rotation" exactly
    for the variants whose factors are composed through a latent (the MLA family)."""
    from analysis.spectral.nulls import NULL_NAMES, NULLS
    from trainer.config import null_for_attention

    assert NULL_NAMES == ("mp", "product", "shuffle", "rotation") and set(NULLS) == set(NULL_NAMES)
    left, right = _gaussian_heads(6, 64, 16, seed=5)
    u = torch.randn(64, generator=torch.Generator().manual_seed(6))
    left[2, :, 0] += 0.5 * u / u.norm()  # one query-key direction shared by both factors of head 2
    right[2, :, 0] += 0.5 * u / u.norm()
    for name, null in NULLS.items():
        an = SpectralAnalyzer(null=name, cache_dir=str(tmp_path), mc_draws=300, shuffle_replicas=2,
                              rotation_draws=50)
        h = an.analyze([[QKFactors(left, right)]], layer_sum=False).heads["content"]
        assert h.null == name and h.pvalue.shape == (1, 6)
        assert torch.isfinite(h.pvalue).all() and ((h.pvalue >= 0) & (h.pvalue <= 1)).all()
        assert torch.isfinite(h.edge).all() and torch.isfinite(h.threshold).all()
        assert int(h.pvalue[0].argmin()) == 2, name
        assert (null.density is None) == (name == "rotation")
        assert null.monte_carlo == (name != "mp")
    for variant, expected in (("mha", "product"), ("gqa", "product"), ("kv_shift", "product"),
                              ("mla", "rotation"), ("mla_prerope", "rotation"), ("mla_kv_shift", "rotation")):
        assert null_for_attention(variant) == expected
