"""Factor-route spectra (analysis/spectral/spectra.py) against dense decompositions."""

import math

import pytest
import torch

from analysis.spectral.spectra import (
    lapack_threads,
    layer_sum_spectrum,
    normalised_eigs,
    product_spectra,
    triangular_factor,
)


@pytest.fixture(autouse=True)
def _one_lapack_thread():
    """Batched dense references stall on a shared 2-core CPU with 2 OpenMP threads (see lapack_threads)."""
    with lapack_threads(1):
        yield


SHAPES = [  # (L, H, d, r): presets, r > d/2, r = d
    (4, 4, 128, 32),
    (2, 3, 64, 48),
    (3, 2, 40, 40),
    (2, 2, 256, 16),
]


def _factors(L: int, H: int, d: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(L, H, d, r, generator=g) * 0.02
    right = torch.randn(L, H, d, r, generator=g) * 0.05
    return left, right


@pytest.mark.parametrize("method", ["cholesky", "qr"])
@pytest.mark.parametrize("shape", SHAPES)
def test_factor_route_matches_dense_svdvals(shape, method):
    L, H, d, r = shape
    left, right = _factors(*shape)
    sp = product_spectra(left.reshape(L * H, d, r), right.reshape(L * H, d, r), method=method)
    dense = torch.linalg.svdvals(left.double() @ right.double().mT)[..., :r].reshape(L * H, r)
    assert sp.sv.shape == (L * H, r) and sp.sv.dtype == torch.float32
    rel = (sp.sv.double() - dense).abs() / dense
    assert rel.max() < 1e-4
    fa = torch.linalg.svdvals(left.double()).reshape(L * H, r)
    assert ((sp.left_sv.double() - fa).abs() / fa).max() < 1e-4
    assert sp.finite.all()


def test_leading_dims_and_chunks_agree():
    left, right = _factors(3, 4, 64, 16)
    whole = product_spectra(left, right)
    assert whole.sv.shape == (3, 4, 16) and whole.top_u.shape == (3, 4, 64)
    chunked = product_spectra(list(left), list(right))
    assert chunked.sv.shape == (12, 16)
    torch.testing.assert_close(chunked.sv, whole.sv.reshape(12, 16))
    torch.testing.assert_close(chunked.top_u.abs(), whole.top_u.reshape(12, 64).abs())


@pytest.mark.parametrize("method", ["cholesky", "qr"])
def test_top_singular_vectors_match_dense(method):
    left, right = _factors(2, 3, 96, 24, seed=1)
    sp = product_spectra(left, right, method=method)
    U, _, Vh = torch.linalg.svd(left.double() @ right.double().mT)
    ou = (sp.top_u.double() * U[..., :, 0]).sum(-1).abs()
    ov = (sp.top_v.double() * Vh[..., 0, :]).sum(-1).abs()
    assert ou.min() > 1 - 1e-5 and ov.min() > 1 - 1e-5
    # u = M v / s: the pair is consistent, not just each vector up to sign
    Mv = ((left.double() @ right.double().mT) @ sp.top_v.double()[..., None]).squeeze(-1)
    cos = (Mv * sp.top_u.double()).sum(-1) / Mv.norm(dim=-1)
    assert cos.min() > 1 - 1e-5


def test_float64_outputs():
    left, right = _factors(1, 2, 64, 16)
    sp = product_spectra(left, right, dtype=torch.float64)
    dense = torch.linalg.svdvals(left.double() @ right.double().mT)[..., :16]
    assert sp.sv.dtype == torch.float64
    assert ((sp.sv - dense).abs() / dense).max() < 1e-10


def test_cholesky_falls_back_to_qr_on_rank_deficient_factor():
    left, right = _factors(1, 3, 64, 16, seed=2)
    left[0, 1, :, 3] = 0.0  # a dead column: singular Gram, Cholesky fails
    left[0, 2, :, 5] = left[0, 2, :, 4]  # duplicate column: exactly rank deficient
    sp = product_spectra(left, right)
    dense = torch.linalg.svdvals(left.double() @ right.double().mT)[..., :16]
    assert torch.isfinite(sp.sv).all() and sp.finite.all()
    assert ((sp.sv.double() - dense).abs()).max() < 1e-5 * dense.max()
    R = triangular_factor(left[0, 1])
    torch.testing.assert_close(torch.linalg.svdvals(R), torch.linalg.svdvals(left[0, 1].double()))


@pytest.mark.parametrize("method", ["cholesky", "qr"])
def test_non_finite_factors_are_nan_not_errors(method):
    left, right = _factors(1, 4, 64, 16)
    left[0, 1, 3, 2] = float("nan")
    right[0, 2, 0, 0] = float("inf")
    left[0, 3] = 0.0  # finite but degenerate
    sp = product_spectra(left, right, method=method)
    assert sp.finite.tolist() == [[True, False, False, True]]
    for t in (sp.sv, sp.left_sv, sp.right_sv, sp.top_u, sp.top_v):
        assert torch.isnan(t[0, 1]).all() and torch.isnan(t[0, 2]).all()
        assert torch.isfinite(t[0, 0]).all()
    assert (sp.sv[0, 3] == 0).all()


def test_rank_larger_than_d_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        product_spectra(torch.randn(2, 8, 16), torch.randn(2, 8, 16))


@pytest.mark.parametrize(
    ("H", "d", "r", "method"),
    [(4, 128, 16, "auto"), (4, 64, 16, "auto"), (6, 64, 16, "auto"), (4, 64, 16, "svd"), (2, 64, 16, "core")],
)
def test_layer_sum_matches_dense(H, d, r, method):
    L = 3
    left, right = _factors(L, H, d, r, seed=3)
    s = layer_sum_spectrum(left, right, method=method)
    k = min(d, H * r)
    dense = torch.linalg.svdvals((left.double() @ right.double().mT).sum(1))[:, :k]
    assert s.shape == (L, k)
    err = (s.double() - dense).abs()
    if H * r < d or method == "svd":  # exact routes: relative accuracy on every value
        assert (err / dense.clamp_min(1e-30)).max() < 1e-4
    else:  # eigenvalues of M Mᵀ: accuracy relative to the top singular value
        assert (err / dense[:, :1]).max() < 1e-4


def test_layer_sum_non_finite_layer_is_nan():
    left, right = _factors(3, 4, 64, 16)
    right[1, 2, 5, 5] = float("nan")
    s = layer_sum_spectrum(left, right)
    assert torch.isnan(s[1]).all() and torch.isfinite(s[[0, 2]]).all()
    s2 = layer_sum_spectrum(list(left), list(right), finite=torch.tensor([True, False, True]))
    torch.testing.assert_close(s2, s, equal_nan=True)


def test_normalised_eigs_have_unit_mean_for_gaussian_factors():
    g = torch.Generator().manual_seed(4)
    d, r, sa, sb = 512, 64, 0.02, 0.3
    A = torch.randn(50, d, r, generator=g) * sa
    B = torch.randn(50, d, r, generator=g) * sb
    sp = product_spectra(A, B)
    lam = normalised_eigs(sp.sv, d, torch.full((50,), sa**2), torch.full((50,), sb**2))
    assert math.isclose(lam.mean().item(), 1.0, rel_tol=0.02)
