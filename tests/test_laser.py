"""LASER: the rank-reduction intervention, the search pieces, and the entry point on a real checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.surgery.laser import (
    Intervention,
    apply_interventions,
    available_taus,
    intervened,
    low_rank,
    matrices,
    mp_keep_rank,
    target_rank,
)
from analysis.surgery.laser_search import SearchConfig, Split, greedy_compose, plot_grid, run_search
from models import GPT, GPTConfig
from tests.png_checks import assert_png_of
from tests.surgery_helpers import check_edited_checkpoint, run_tool
from trainer.checkpoints import load_lit_gpt

ATTENTIONS = [{"name": "mha"}, {"name": "gqa", "n_kv_head": 2}, {"name": "mla", "kv_lora_rank": 16,
              "q_lora_rank": 24}, {"name": "mla_prerope", "kv_lora_rank": 16}]


def tiny(attention: dict | None = None, **kw: object) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, d_model=32, n_head=4,
                    attention=attention or {"name": "mha"}, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("attention", ATTENTIONS, ids=lambda a: a["name"])
def test_rho_one_is_the_identity(attention: dict) -> None:
    m = tiny(attention)
    idx = torch.randint(0, 61, (2, 12))
    before = m(idx)[0]
    taus = available_taus(m)
    assert {"o", "mlp_in", "mlp_out"} <= set(taus)
    with intervened(m, [Intervention(t, layer, 1.0) for t in taus for layer in (0, 1)]) as done:
        assert all(d["rank"] == min(d["shape"]) for d in done)
        torch.testing.assert_close(m(idx)[0], before, rtol=1e-5, atol=1e-5)
    assert torch.equal(m(idx)[0], before)  # restored exactly


@pytest.mark.parametrize("method", ["svd", "lowrank"])
def test_rank_after_reduction_is_as_requested(method: str) -> None:
    torch.manual_seed(1)
    W = torch.randn(48, 20)
    for rho in (0.9, 0.5, 0.25, 0.1, 0.05, 0.01):
        r = target_rank(W.shape, rho)
        assert r == max(1, int(rho * 20 + 1e-9))
        assert torch.linalg.matrix_rank(low_rank(W, r, method)) == r
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = (U[:, :5] * S[:5]) @ Vh[:5]
    torch.testing.assert_close(low_rank(W, 5, "svd"), best, rtol=1e-5, atol=1e-5)  # Eckart-Young optimum


def test_interventions_compose_and_cover_mla_latents() -> None:
    m = tiny({"name": "mla", "kv_lora_rank": 16, "q_lora_rank": 24})
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"} <= set(available_taus(m))
    ivs = [Intervention("kv_b_proj", 1, 0.25), Intervention("mlp_in", 0, 0.5), Intervention("kv_b_proj", 1, 0.5)]
    apply_interventions(m, ivs)
    assert torch.linalg.matrix_rank(m.blocks[1].attn.kv_b_proj.weight) == 4  # min(rank 4, rank 8)
    for _, lin in matrices(m, "mlp_in", 0):
        assert torch.linalg.matrix_rank(lin.weight) == 16
    with pytest.raises(ValueError, match="available"):
        matrices(m, "q", 0)


def test_mp_edge_keeps_the_planted_spikes() -> None:
    g = torch.Generator().manual_seed(0)
    m, n, sigma = 300, 120, 0.05
    noise = sigma * torch.randn(m, n, generator=g)
    u, v = torch.linalg.qr(torch.randn(m, 3, generator=g))[0], torch.linalg.qr(torch.randn(n, 3, generator=g))[0]
    spikes = (u * torch.tensor([6.0, 4.0, 3.0])) @ v.T  # well above the edge σ(√m + √n) ≈ 1.41
    fit = mp_keep_rank(noise + spikes)
    assert fit["rank"] == 3
    assert abs(fit["sigma"] - sigma) / sigma < 0.1
    plain = mp_keep_rank(noise + spikes, tw_level=None)
    assert abs(plain["edge"] - fit["sigma"] * (m**0.5 + n**0.5)) < 1e-9 and plain["edge"] < fit["edge"]
    assert mp_keep_rank(noise)["rank"] == 1  # pure noise: nothing above the edge (rank floored at 1)


def test_greedy_composition_walks_layers_last_to_first() -> None:
    """A metric that rewards reducing mlp_in everywhere except in layer 0 keeps every step but those."""
    m = tiny()
    split = Split(10)

    def evaluate(model: GPT) -> tuple[np.ndarray, np.ndarray]:
        ranks = [torch.linalg.matrix_rank(model.blocks[i].mlp.gate_proj.weight).item() for i in (0, 1)]
        loss = ranks[1] / 100 + (0.0 if ranks[0] == 32 else 1.0)  # layer 1: lower rank is better
        return np.full(10, loss), np.zeros(10)

    chosen, trace = greedy_compose(m, evaluate, SearchConfig(compose_tau="mlp_in"), split)
    assert chosen == [Intervention("mlp_in", 1, 0.02)]
    assert [(r["layer"], r["accepted"]) for r in trace] == [(1, True)] * 4 + [(0, False)]
    assert torch.linalg.matrix_rank(m.blocks[1].mlp.gate_proj.weight) == 32  # the model is left unchanged


def test_search_skips_matrix_types_the_variant_lacks() -> None:
    m = tiny({"name": "mla", "kv_lora_rank": 16, "q_lora_rank": 24})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 61, (10, 16), generator=g), torch.randint(0, 61, (10, 16), generator=g)
    cfg = SearchConfig(taus=["k", "kv_b_proj"], rhos=[0.5], compose=False, rmt=False)
    result = run_search(m, x, y, cfg)
    assert result.skipped_taus == ["k"]
    assert [(r["tau"], r["layer"]) for r in result.rows if r["kind"] == "grid"] == [("kv_b_proj", 0), ("kv_b_proj", 1)]
    with pytest.raises(ValueError, match=r"\[5\] out of range"):
        run_search(m, x, y, SearchConfig(taus=["o"], layers=[5], compose=False, rmt=False))


def test_entry_point_writes_grid_plot_and_loadable_checkpoint(surgery_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "laser"
    proc = run_tool("trainer.laser", f"ckpt='{surgery_checkpoint}'", f"out={out}", "search.taus=[mlp_in,o]",
                    "search.layers=[2,3]", "search.rhos=[0.5,0.05]", "search.compose_schedule=[0.45,0.9]",
                    "eval.n_blocks=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    grid = [r for r in result["rows"] if r["kind"] == "grid"]
    assert len(grid) == 2 * 2 * 2 and {r["tau"] for r in grid} == {"mlp_in", "o"}
    assert all(np.isfinite([r["val_loss"], r["test_loss"], r["test_acc"]]).all() for r in grid)
    assert {"base", "rmt", "rmt_all", "compose"} <= {r["kind"] for r in result["rows"]}
    verdict, base, best = result["verdict"], result["base"], result["best"]
    assert verdict["best_improves_heldout"] == (best["test_loss"] < base["test_loss"])
    assert verdict["grid_points_better_heldout"] == sum(r["test_loss"] < base["test_loss"] for r in grid)
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"kind", "tau", "layer", "rho", "val_loss", "test_loss", "test_acc"} <= set(header)
    assert (out / "laser.png").stat().st_size > 0
    # the plot: a panel per tau, in it a line per layer through (rho, held-out loss), the base model dashed
    fig = plot_grid(result["rows"], title=f"LASER: {surgery_checkpoint.name}")
    assert [ax.get_title() for ax in fig.axes] == ["τ = mlp_in", "τ = o"]
    for ax, tau in zip(fig.axes, ("mlp_in", "o"), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"layer 2", "layer 3", "base"} and ax.get_xscale() == "log"
        for layer in (2, 3):
            pts = sorted((r["rho"], r["test_loss"]) for r in grid if r["tau"] == tau and r["layer"] == layer)
            assert [tuple(map(float, xy)) for xy in zip(*lines[f"layer {layer}"].get_data(), strict=True)] == pts
        assert list(lines["base"].get_ydata()) == [base["test_loss"]] * 2
    assert_png_of(out / "laser.png", fig, dpi=120)  # the file is this figure, 960 x 360 px

    module = check_edited_checkpoint(out / "laser.ckpt", surgery_checkpoint)
    ckpt = torch.load(out / "laser.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["qkscope_edit"]["tool"] == "laser"
    for applied in ckpt["qkscope_edit"]["applied"]:
        weight = module.model.get_submodule(applied["matrix"]).weight
        assert torch.linalg.matrix_rank(weight) <= applied["rank"]


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt does not exist"):
        load_lit_gpt(tmp_path / "run" / "checkpoints" / "nope.ckpt")
