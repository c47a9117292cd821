"""Per-matrix metrics and multiple testing (analysis/spectral/: metrics.py, multitest.py) on known answers."""

import math

import pytest
import torch

from analysis.spectral import metrics
from analysis.spectral.multitest import benjamini_hochberg, bonferroni

NAN = float("nan")


def test_stable_rank_and_effective_rank_known_spectra():
    flat = torch.ones(2, 32, dtype=torch.float64) * 3.0
    rank1 = torch.zeros(1, 32, dtype=torch.float64)
    rank1[0, 0] = 5.0
    two = torch.tensor([[4.0, 4.0, 0.0, 0.0]], dtype=torch.float64)
    assert metrics.stable_rank(flat).tolist() == [32.0, 32.0]
    assert metrics.stable_rank(rank1).item() == 1.0
    assert metrics.effective_rank(flat)[0].item() == pytest.approx(32.0)
    assert metrics.effective_rank(rank1).item() == pytest.approx(1.0)
    assert metrics.effective_rank(two).item() == pytest.approx(2.0)
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert metrics.effective_rank(p[None] * 8).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    nan_row = torch.tensor([[NAN, 1.0]])
    assert math.isnan(metrics.stable_rank(nan_row).item()) and math.isnan(metrics.effective_rank(nan_row).item())


def test_softrank_tw_score_and_spike_count():
    eigs = torch.tensor([[5.0, 3.0, 2.5, 1.0], [2.0, 1.5, 1.0, 0.5], [NAN, NAN, NAN, NAN]], dtype=torch.float64)
    assert metrics.lambda_max(eigs)[:2].tolist() == [5.0, 2.0]
    assert metrics.mp_softrank(torch.tensor(2.5), torch.tensor(5.0)).item() == 0.5
    assert metrics.tw_zscore(torch.tensor(3.0), torch.tensor(2.0), torch.tensor(0.5)).item() == 2.0
    thr = torch.tensor([2.4, 2.4, 2.4], dtype=torch.float64)
    assert metrics.num_spikes(eigs, thr).tolist() == [3, 0, 0]


def test_ks_distance_known_values():
    n = 50
    u = (torch.arange(1, n + 1, dtype=torch.float64) - 0.5) / n  # exact uniform quantiles
    eigs = u[torch.randperm(n)][None]
    assert metrics.ks_distance(eigs, eigs.clone()).item() == pytest.approx(0.5 / n)  # F(x) = x
    shifted = (eigs + 0.2).clamp(max=1.0)  # null CDF evaluated at shifted values
    assert metrics.ks_distance(eigs, shifted).item() == pytest.approx(0.2 + 0.5 / n, abs=1e-9)
    assert math.isnan(metrics.ks_distance(torch.tensor([[NAN, 1.0]]), torch.tensor([[0.5, 0.5]])).item())


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_powerlaw_alpha_on_a_synthetic_power_law(alpha):
    """Exact quantiles of p(x) ∝ x^{-α} on x ≥ 1 (plus a sub-xmin bulk the fit must skip)."""
    n = 400
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tail = (1 - u) ** (-1 / (alpha - 1))  # inverse CDF
    bulk = torch.linspace(0.05, 0.9, 100, dtype=torch.float64)
    eigs = torch.sort(torch.cat([tail, bulk]), descending=True).values[None]
    a, xmin = metrics.powerlaw_alpha(eigs)
    assert a.item() == pytest.approx(alpha, abs=0.1)
    assert xmin.item() == pytest.approx(1.0, abs=0.1)


def test_powerlaw_alpha_random_sample_and_nan_cases():
    g = torch.Generator().manual_seed(0)
    x = (1 - torch.rand(3, 300, generator=g, dtype=torch.float64)) ** (-1 / 2.0)  # α = 3
    a, _ = metrics.powerlaw_alpha(torch.sort(x, descending=True).values)
    assert ((a - 3.0).abs() < 0.45).all()
    short = torch.ones(2, 5, dtype=torch.float64)
    assert torch.isnan(metrics.powerlaw_alpha(short, min_tail=8)[0]).all()
    bad = torch.tensor([[NAN] + [1.0] * 15], dtype=torch.float64)
    assert torch.isnan(metrics.powerlaw_alpha(bad)[0]).all()
    flat = torch.ones(1, 16, dtype=torch.float64)  # no tail to fit
    assert torch.isnan(metrics.powerlaw_alpha(flat)[0]).all()


def test_vector_overlap():
    u = torch.nn.functional.normalize(torch.randn(2, 3, 16), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(2, 3, 16), dim=-1)
    assert torch.isnan(metrics.vector_overlap(None, None, u, v)).all()
    torch.testing.assert_close(metrics.vector_overlap(u, v, -u, v), torch.ones(2, 3))
    e = torch.eye(16)
    assert metrics.vector_overlap(e[:1], e[:1], e[1:2], e[:1]).item() == 0.0
    assert torch.isnan(metrics.vector_overlap(u[:1], v[:1], u, v)).all()  # shapes changed


def test_bonferroni_and_benjamini_hochberg():
    p = torch.tensor([[0.001, 0.008, 0.039], [0.041, 0.042, 0.06], [0.074, 0.205, NAN]])
    # m = 8 finite p-values
    assert bonferroni(p, 0.05).sum().item() == 1  # 0.05/8 = 0.00625
    # BH at q = 0.05: i·q/m = 0.00625, 0.0125, 0.01875, 0.025, ... -> only the first two pass
    bh = benjamini_hochberg(p, 0.05)
    assert bh.tolist() == [[True, True, False], [False, False, False], [False, False, False]]
    # the classic step-up property: a later p under its bound rescues earlier ones
    p2 = torch.tensor([0.01, 0.03, 0.035, 0.5])  # bounds 0.0125, 0.025, 0.0375, 0.05
    assert benjamini_hochberg(p2, 0.05).tolist() == [True, True, True, False]
    assert not bonferroni(torch.full((2, 2), NAN)).any()
    assert not benjamini_hochberg(torch.full((2, 2), NAN)).any()
