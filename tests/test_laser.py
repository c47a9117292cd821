"""LASER: the rank-reduction intervention, the search pieces, and the entry point on a real checkpoint."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback

from analysis.laser import (
    Intervention,
    SearchConfig,
    Split,
    apply_interventions,
    available_taus,
    greedy_compose,
    intervened,
    low_rank,
    matrices,
    mp_keep_rank,
    run_search,
    target_rank,
)
from models import GPT, GPTConfig
from tests.conftest import ROOT, run_train
from trainer.checkpoints import load_lit_gpt, run_datamodule
from trainer.lit_gpt import LitGPT

ATTENTIONS = [{"name": "mha"}, {"name": "gqa", "n_kv_head": 2}, {"name": "mla", "kv_lora_rank": 16,
              "q_lora_rank": 24}, {"name": "mla_prerope", "kv_lora_rank": 16}]


def tiny(attention: dict | None = None, **kw: object) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, d_model=32, n_head=4,
                    attention=attention or {"name": "mha"}, **kw)
    return GPT(cfg).eval()


def surgery_checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus_cache: Path) -> Path:
    """`checkpoints/last.ckpt` of one real debug training run, shared by the surgery test modules
    (the run directory sits in the session's base temp, and a finished run is not retrained)."""
    root = tmp_path_factory.getbasetemp() / "surgery_runs"
    done = list(root.glob("default/*/DONE"))
    if not done:
        proc = run_train("trainer=debug", "logger=csv", "spectral=off", f"paths.root={root}",
                         f"paths.cache_dir={corpus_cache}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = list(root.glob("default/*/DONE"))
    return done[0].parent / "checkpoints" / "last.ckpt"


def run_tool(module: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a post-training entry point (`python -m trainer.<tool>`) in a subprocess from the repository root."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check_edited_checkpoint(path: Path, source: Path) -> LitGPT:
    """The edited checkpoint loads like a training one, generates, and Lightning's Trainer resumes
    from it (its weights are the ones training continues from) on the source run's data."""
    module = LitGPT.load_from_checkpoint(path, map_location="cpu").eval()
    out = module.model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 8)
    edited = {k: v.clone() for k, v in module.state_dict().items()}
    step = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    seen = {}

    def record(trainer: L.Trainer, lit: LitGPT) -> None:
        seen.update({k: v.detach().clone() for k, v in lit.state_dict().items()})

    trainer = L.Trainer(accelerator="cpu", max_steps=step + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[LambdaCallback(on_train_start=record)])
    resumed = LitGPT.load_from_checkpoint(path, map_location="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the source run's callbacks are absent here, which Lightning mentions
        trainer.fit(resumed, datamodule=run_datamodule(source), ckpt_path=path)
    assert trainer.global_step == step + 1
    assert all(torch.equal(seen[k], v) for k, v in edited.items())
    return module


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, corpus_cache: Path) -> Path:
    return surgery_checkpoint(tmp_path_factory, corpus_cache)


def test_entry_point_writes_grid_plot_and_loadable_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "laser"
    proc = run_tool("trainer.laser", f"ckpt='{checkpoint}'", f"out={out}", "search.taus=[mlp_in,o]",
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

    module = check_edited_checkpoint(out / "laser.ckpt", checkpoint)
    ckpt = torch.load(out / "laser.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["qkscope_edit"]["tool"] == "laser"
    for applied in ckpt["qkscope_edit"]["applied"]:
        weight = module.model.get_submodule(applied["matrix"]).weight
        assert torch.linalg.matrix_rank(weight) <= applied["rank"]


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt does not exist"):
        load_lit_gpt(tmp_path / "run" / "checkpoints" / "nope.ckpt")
