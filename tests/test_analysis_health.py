"""The callback's entry point: SpectralAnalyzer.analyze on real models and hand-made factor lists."""

import dataclasses
import math

import pytest
import torch

from analysis.spectral import HeadSpectra, SpectralAnalyzer, SpectralReport, benjamini_hochberg, bonferroni
from analysis.spectral.spectra import lapack_threads
from models import GPT, GPTConfig
from models.config import AttentionConfig
from models.probe import QKFactors

LH_FIELDS = [
    "lambda_max", "edge", "threshold", "sigma2", "pvalue", "tw_z", "stable_rank", "eff_rank",
    "mp_softrank", "ks", "alpha", "pvalue_mc", "spectral_norm",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_lapack_thread():
    with lapack_threads(1):
        yield


@pytest.fixture
def analyzer(tmp_path) -> SpectralAnalyzer:
    return SpectralAnalyzer(cache_dir=str(tmp_path), mc_draws=500)


def _tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=3, d_model=64, n_head=4, **kw))


def test_report_shapes_dtypes_and_devices(analyzer):
    model = _tiny()
    report = analyzer.analyze(model.qk_factors())
    assert isinstance(report, SpectralReport) and list(report.heads) == ["content"]
    h = report.heads["content"]
    assert isinstance(h, HeadSpectra) and h.kind == "content"
    assert h.eigs.shape == (3, 4, 16) and h.eigs.dtype == torch.float32
    assert (h.eigs[..., :-1] >= h.eigs[..., 1:]).all()  # descending
    for name in LH_FIELDS:
        t = getattr(h, name)
        assert t.shape == (3, 4) and t.dtype == torch.float32 and t.device.type == "cpu", name
    assert h.num_spikes.dtype == torch.int64 and h.finite.dtype == torch.bool and h.finite.all()
    assert h.top_u.shape == (3, 4, 64) and h.top_v.shape == (3, 4, 64)
    torch.testing.assert_close(h.top_u.norm(dim=-1), torch.ones(3, 4))
    assert torch.isnan(h.overlap).all()  # first check
    torch.testing.assert_close(h.lambda_max, h.eigs[..., 0])
    assert ((h.pvalue > 0) & (h.pvalue <= 1)).all()
    assert ((h.pvalue < h.fa_level) == (h.lambda_max > h.threshold)).all()
    assert not any(t.requires_grad for t in (h.eigs, h.top_u, h.lambda_max))
    assert report.layer_sum.shape == (3, 64) and (report.layer_sum[:, :-1] >= report.layer_sum[:, 1:]).all()
    assert report.seconds > 0
    for key in ("q", "k"):
        assert report.factors[key].shape == (3, 4, 16)
        for suffix in ("sigma2", "edge", "threshold", "pvalue", "spikes"):
            assert report.factors[f"{key}_{suffix}"].shape == (3, 4)


def test_values_against_direct_computation(analyzer):
    model = _tiny()
    layers = model.qk_factors()
    h = analyzer.analyze(layers).heads["content"]
    f = layers[1][0]
    A, B = f.left[2].double(), f.right[2].double()
    s = torch.linalg.svdvals(A @ B.T)[:16]
    ratio = (s**2 / h.eigs[1, 2].double()) / (64**2)  # = σ̂_A² σ̂_B², the same for every i
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-4, atol=0)
    assert ratio[0].item() == pytest.approx(h.sigma2[1, 2].item(), rel=1e-4)
    assert ratio[0].item() == pytest.approx(0.02**4, rel=0.1)  # init std 0.02 on both factors
    # edge of the product null in normalised units, independent of the weights' scale
    assert h.edge[0, 0].item() == pytest.approx(3.098, abs=1e-3)


def test_overlap_is_one_for_unchanged_weights_and_drops_after_rotation(analyzer):
    model = _tiny()
    first = analyzer.analyze(model.qk_factors())
    again = analyzer.analyze(model.qk_factors(), previous=first)
    torch.testing.assert_close(again.heads["content"].overlap, torch.ones(3, 4), atol=1e-4, rtol=0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_proj.weight.normal_(0, 0.02)
    moved = analyzer.analyze(model.qk_factors(), previous=again).heads["content"].overlap
    assert moved.max() < 0.5


def test_non_finite_weights_never_raise(analyzer):
    model = _tiny()
    with torch.no_grad():
        model.blocks[1].attn.q_proj.weight[16 + 3, 5] = float("nan")  # head 1 of layer 1
        model.blocks[2].attn.k_proj.weight[0, 0] = float("inf")  # key head 0 of layer 2
    report = analyzer.analyze(model.qk_factors())
    h = report.heads["content"]
    bad = torch.zeros(3, 4, dtype=torch.bool)
    bad[1, 1] = bad[2, 0] = True
    assert (h.finite == ~bad).all()
    for name in [*LH_FIELDS, "eigs", "top_u", "top_v"]:
        t = getattr(h, name)
        assert torch.isnan(t[bad]).all(), name
        assert torch.isfinite(t[~bad]).all() or name == "alpha", name
    assert (h.num_spikes[bad] == 0).all()
    assert torch.isnan(report.factors["q"][1, 1]).all() and torch.isnan(report.factors["k_sigma2"][2, 0])
    assert torch.isnan(report.layer_sum[1:]).all() and torch.isfinite(report.layer_sum[0]).all()
    # an overlap against a report with NaN vectors is NaN, not an error
    assert torch.isnan(analyzer.analyze(model.qk_factors(), previous=report).heads["content"].overlap[bad]).all()


@pytest.mark.parametrize("null", ["mp", "product", "shuffle", "rotation"])
def test_all_nan_model_and_each_null(tmp_path, null):
    model = _tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    an = SpectralAnalyzer(null=null, cache_dir=str(tmp_path), mc_draws=200, shuffle_replicas=2, rotation_draws=20)
    h = an.analyze(model.qk_factors()).heads["content"]
    assert not h.finite.any() and torch.isnan(h.pvalue).all() and (h.num_spikes == 0).all()


def test_zero_head_is_finite_with_nan_metrics(analyzer):
    layers = _tiny().qk_factors()
    with torch.no_grad():
        layers[0][0].left[2].zero_()
    h = analyzer.analyze(layers).heads["content"]
    assert h.finite.all() and torch.isnan(h.lambda_max[0, 2]) and torch.isfinite(h.lambda_max[0, 1])


def test_gqa_and_nulls_agree_on_shapes(tmp_path):
    model = _tiny(attention=AttentionConfig(name="gqa", n_kv_head=2))
    for null in ("mp", "product", "shuffle", "rotation"):
        an = SpectralAnalyzer(null=null, cache_dir=str(tmp_path), mc_draws=300, shuffle_replicas=2, rotation_draws=50)
        report = an.analyze(model.qk_factors())
        h = report.heads["content"]
        assert h.null == null and report.null == null and h.finite.all()
        assert torch.isfinite(h.pvalue).all() and torch.isfinite(h.threshold).all()
    assert torch.isnan(h.pvalue_mc).sum() == 0


def test_mp_null_flags_initialised_heads_product_does_not(tmp_path):
    model = _tiny()
    kw = {"cache_dir": str(tmp_path), "mc_draws": 500}
    mp = SpectralAnalyzer(null="mp", **kw).analyze(model.qk_factors()).heads["content"]
    prod = SpectralAnalyzer(null="product", **kw).analyze(model.qk_factors()).heads["content"]
    assert (mp.num_spikes > 0).float().mean() > 0.5
    assert (prod.num_spikes > 0).sum() <= 1
    assert torch.isnan(mp.pvalue_mc).all()


def test_rope_kind_with_shared_key(analyzer):
    g = torch.Generator().manual_seed(1)
    layers = []
    for _ in range(2):
        content = QKFactors(torch.randn(4, 64, 16, generator=g), torch.randn(4, 64, 16, generator=g))
        shared = torch.randn(64, 8, generator=g)
        rope = QKFactors(torch.randn(4, 64, 8, generator=g), shared.expand(4, 64, 8), "rope")
        layers.append([content, rope])
    report = analyzer.analyze(layers)
    assert list(report.heads) == ["content", "rope"]
    assert report.heads["rope"].eigs.shape == (2, 4, 8)
    assert "rope_q" in report.factors and report.factors["rope_k"].shape == (2, 4, 8)
    k = report.factors["rope_k"]
    torch.testing.assert_close(k, k[:, :1].expand_as(k))  # one shared key per layer
    assert report.layer_sum.shape == (2, 64)  # content kind only


def test_layer_sum_can_be_skipped_per_call(analyzer):
    layers = _tiny().qk_factors()
    assert analyzer.analyze(layers, layer_sum=False).layer_sum.shape == (3, 0)
    off = SpectralAnalyzer(cache_dir=analyzer.calibrator.cache_dir, layer_sum=False, mc_draws=500)
    assert off.analyze(layers).layer_sum.numel() == 0


def test_float64_dtype_and_requires_grad_inputs(tmp_path):
    model = _tiny()
    an = SpectralAnalyzer(cache_dir=str(tmp_path), mc_draws=500, dtype=torch.float64)
    h = an.analyze(model.qk_factors()).heads["content"]
    assert h.eigs.dtype == torch.float32 and h.top_u.dtype == torch.float32  # the report is float32
    assert all(p.grad is None for p in model.parameters())


def test_null_density_integrates_to_one(analyzer):
    grid = torch.linspace(0, 8, 20001, dtype=torch.float64)
    for kind in ("mp", "product", "shuffle", "content", "rope"):
        dens = analyzer.null_density(kind, 128, 32, grid)
        assert dens.shape == grid.shape and (dens >= 0).all()
        assert torch.trapezoid(dens, grid).item() == pytest.approx(1.0, abs=3e-3)
    assert analyzer.null_density("rotation", 128, 32, grid) is None  # per head: no one curve is its law
    draws = analyzer.null_lambda_max(64, 16)
    assert draws.shape == (500,) and (draws[1:] >= draws[:-1]).all()


def test_invalid_arguments_and_inputs(analyzer):
    with pytest.raises(ValueError, match="null="):
        SpectralAnalyzer(null="wishart")
    with pytest.raises(ValueError, match="fa_level"):
        SpectralAnalyzer(fa_level=0.0)
    with pytest.raises(ValueError, match="dtype"):
        SpectralAnalyzer(dtype=torch.float16)
    with pytest.raises(ValueError, match="at least one layer"):
        analyzer.analyze([])
    f = QKFactors(torch.randn(2, 32, 8), torch.randn(2, 32, 8))
    g = QKFactors(torch.randn(2, 32, 4), torch.randn(2, 32, 4))
    with pytest.raises(ValueError, match="shape"):
        analyzer.analyze([[f], [g]])


def test_multiple_testing_on_a_report(analyzer):
    h = analyzer.analyze(_tiny().qk_factors()).heads["content"]
    assert bonferroni(h.pvalue, 0.01).shape == (3, 4)
    assert benjamini_hochberg(h.pvalue, 0.05).sum() <= (h.pvalue < 0.05).sum()


def test_report_fields_match_the_contract():
    names = [f.name for f in dataclasses.fields(HeadSpectra)]
    contract = [
        "kind", "eigs", "lambda_max", "edge", "threshold", "sigma2", "pvalue", "num_spikes", "tw_z",
        "stable_rank", "eff_rank", "mp_softrank", "ks", "alpha", "overlap", "top_u", "top_v", "finite",
        "spectral_norm",  # added for the callback's runaway-norm rule
    ]  # fmt: skip
    assert names[: len(contract)] == contract
    assert [f.name for f in dataclasses.fields(SpectralReport)][:4] == ["heads", "factors", "layer_sum", "seconds"]
    assert math.isclose(SpectralAnalyzer().fa_level, 0.01)
