"""Attention-matrix mask pruning: the closed-form gradient, the maps, the masks, and the entry point."""

import json
from pathlib import Path

import pytest
import torch

from analysis.surgery.attention_map import attention_map, mask_grad, mask_loss, merged_mask_grad, merged_mask_loss
from analysis.surgery.pruning import (
    LearnConfig,
    PruneConfig,
    attention_inputs,
    binarize,
    head_inputs,
    plot_study,
    prune_qk,
    qk_weights,
)
from models import GPT, GPTConfig
from models.kv_shift import shift
from tests.png_checks import assert_png_of
from tests.surgery_helpers import check_edited_checkpoint, run_tool

VARIANTS = [{"name": "mha"}, {"name": "gqa", "n_kv_head": 2}, {"name": "kv_shift", "n_kv_head": 2}]


def tiny(attention: dict, init_std: float = 0.02) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=53, block_size=16, n_layer=2, d_model=16, n_head=4, attention=attention,
                    init_std=init_std)
    return GPT(cfg).double().eval()


def finite_difference(f, x: torch.Tensor, index: tuple[int, ...], h: float = 1e-6) -> float:
    up, down = x.clone(), x.clone()
    up[index] += h
    down[index] -= h
    return float((f(up) - f(down)) / (2 * h))


def test_merged_closed_form_gradient_matches_autograd_and_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    W = torch.randn(4, 4, generator=g, dtype=torch.float64)
    M = torch.rand(4, 4, generator=g, dtype=torch.float64).requires_grad_()
    lam = 0.05
    merged_mask_loss(X, W, M, lam).backward()
    closed = merged_mask_grad(X, W, M.detach(), lam)
    torch.testing.assert_close(closed, M.grad, rtol=1e-10, atol=1e-12)
    for index in [(0, 0), (1, 3), (3, 2)]:
        fd = finite_difference(lambda m: merged_mask_loss(X, W, m, lam), M.detach(), index)
        assert abs(fd - float(closed[index])) < 1e-7


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: a["name"])
def test_factored_closed_form_gradient_with_rope(attention: dict) -> None:
    """∂L/∂M_Q, ∂L/∂M_K (RoPE, shared GQA keys, KV-shift inputs) against autograd and finite differences."""
    m = tiny(attention, init_std=0.5)  # large weights: a peaked, mask-sensitive attention map
    idx = torch.randint(0, 53, (2, 7), generator=torch.Generator().manual_seed(1))
    attn = m.blocks[0].attn
    inp = head_inputs(attn, attention_inputs(m, idx)[0])
    wq, wk = (w.detach() for w in qk_weights(attn))
    a_ref = attention_map(inp, wq, wk)
    g = torch.Generator().manual_seed(2)
    mq = (0.5 + torch.rand(wq.shape, generator=g, dtype=torch.float64)).requires_grad_()
    mk = (0.5 + torch.rand(wk.shape, generator=g, dtype=torch.float64)).requires_grad_()
    lam = 1e-3
    mask_loss(inp, wq, wk, mq, mk, a_ref, lam).backward()
    loss, gq, gk = mask_grad(inp, wq, wk, mq.detach(), mk.detach(), a_ref, lam)
    assert float(loss) > 1e-3 and float((gq - lam * mq.detach()).abs().max()) > 1e-3  # a real fit term
    torch.testing.assert_close(gq, mq.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gk, mk.grad, rtol=1e-9, atol=1e-12)
    for index in [(0, 0, 0), (3, 3, 7)]:
        fd = finite_difference(lambda x: mask_loss(inp, wq, wk, x, mk.detach(), a_ref, lam), mq.detach(), index)
        assert abs(fd - float(gq[index])) < 1e-7
    for index in [(1, 2, 3)]:
        fd = finite_difference(lambda x: mask_loss(inp, wq, wk, mq.detach(), x, a_ref, lam), mk.detach(), index)
        assert abs(fd - float(gk[index])) < 1e-7


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: a["name"])
def test_attention_map_is_the_modules_own(attention: dict) -> None:
    """A @ V reproduces the heads' outputs that the module feeds to o_proj."""
    m = tiny(attention, init_std=0.3)
    idx = torch.randint(0, 53, (2, 9))
    attn = m.blocks[1].attn
    x = attention_inputs(m, idx)[1]
    captured = []
    handle = attn.o_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    m(idx)
    handle.remove()
    A = attention_map(head_inputs(attn, x), *qk_weights(attn))  # (B, H, T, T)
    B, T, _ = x.shape
    v = attn.v_proj(x).view(B, T, attn.n_kv_head, -1).transpose(1, 2)  # (B, G, T, dh)
    if attention["name"] == "kv_shift":
        v = attn.beta1[:, None, None] * v + attn.beta2[:, None, None] * shift(v)
    v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # (B, H, T, dh)
    torch.testing.assert_close((A @ v).transpose(1, 2).reshape(B, T, -1), captured[0])


def test_binarize_meets_the_sparsity_per_group() -> None:
    score = torch.rand(6, 10)
    for group in ("matrix", "row"):
        mask = binarize(score, 0.3, group)
        assert mask.sum() == 60 - 18
        if group == "row":
            assert (mask.sum(1) == 7).all()
    mask = binarize(score, 0.5, "matrix")
    assert score[mask == 1].min() >= score[mask == 0].max()


@pytest.mark.parametrize("method,learn", [
    ("learned", LearnConfig(steps=20)), ("learned", LearnConfig(steps=10, rounds=2, refit=True)),
    ("magnitude", None), ("wanda", None),
], ids=["learned", "learned-rounds-refit", "magnitude", "wanda"])
def test_prune_zeroes_exactly_the_requested_fraction(method: str, learn: LearnConfig | None) -> None:
    m = tiny({"name": "gqa", "n_kv_head": 2}, init_std=0.3).float()
    before = [b.attn.q_proj.weight.clone() for b in m.blocks]
    calib = torch.randint(0, 53, (3, 16))
    records = prune_qk(m, calib, PruneConfig(method=method, sparsity=0.5, learn=learn))
    for block, rec, w in zip(m.blocks, records, before, strict=True):
        assert rec["sparsity_q"] == 0.5 and rec["sparsity_k"] == 0.5
        assert (block.attn.q_proj.weight == 0).float().mean() == 0.5
        kept = block.attn.q_proj.weight != 0
        if learn is not None and learn.refit:
            assert not torch.equal(block.attn.q_proj.weight[kept], w[kept])  # rescaled by the refitted mask
        else:
            assert torch.equal(block.attn.q_proj.weight[kept], w[kept])  # a 0/1 mask
        if method == "learned":
            assert rec["mask_q_mean"] < 1 and rec["loss_last"] > 0  # the relaxed masks moved off M = 1
    assert torch.isfinite(m(calib)[0]).all()


def test_mla_is_refused_with_a_clear_error() -> None:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=53, block_size=16, n_layer=1, d_model=16, n_head=4,
                      attention={"name": "mla", "kv_lora_rank": 8}))
    with pytest.raises(NotImplementedError, match="supports mha, gqa and kv_shift"):
        prune_qk(m, torch.randint(0, 53, (1, 8)), PruneConfig(method="magnitude"))


def test_entry_point_prunes_and_writes_a_loadable_checkpoint(surgery_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "prune"
    proc = run_tool("trainer.prune", f"ckpt='{surgery_checkpoint}'", f"out={out}", "sparsity=0.5", "method=learned",
                    "study=true", "study_sparsities=[0.3,0.7]", "study_methods=[magnitude,wanda]",
                    "prune.learn.steps=5", "calib.n_blocks=2", "eval.n_blocks=4", "eval.n_attn_blocks=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    got = [(r["method"], r["sparsity"]) for r in rows]
    assert got == [("dense", 0.0), ("magnitude", 0.3), ("wanda", 0.3), ("magnitude", 0.7), ("wanda", 0.7),
                   ("learned", 0.5)]
    assert all(r["attn_err"] > 0 and r["val_ppl"] > 1 for r in rows[1:])
    assert (out / "results.csv").read_text().startswith("method,sparsity,attn_err")
    assert (out / "prune.png").stat().st_size > 0
    # the plot: per panel one line per method through its (sparsity, value) rows, the dense perplexity dashed
    fig = plot_study(rows, title=f"Q/K pruning: {surgery_checkpoint.name}")
    assert len(fig.axes) == 3
    for ax, key in zip(fig.axes, ("val_ppl", "attn_err", "attn_err_e2e"), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"magnitude", "wanda", "learned"} | ({"dense"} if key == "val_ppl" else set())
        for method in ("magnitude", "wanda", "learned"):
            pts = sorted((r["sparsity"], r[key]) for r in rows if r["method"] == method)
            assert [tuple(map(float, xy)) for xy in zip(*lines[method].get_data(), strict=True)] == pts
    dense = next(line for line in fig.axes[0].get_lines() if line.get_label() == "dense")
    assert list(dense.get_ydata()) == [rows[0]["val_ppl"]] * 2
    assert_png_of(out / "prune.png", fig, dpi=120)  # the file is this figure, 1440 x 408 px
    module = check_edited_checkpoint(out / "pruned.ckpt", surgery_checkpoint)
    for block in module.model.blocks:
        assert (block.attn.q_proj.weight == 0).float().mean() == 0.5
        assert (block.attn.k_proj.weight == 0).float().mean() == 0.5
