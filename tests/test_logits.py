"""Attention logits: the weight-only bound against measured logits and a dense reference, QK-norm, QK-Clip."""

import pytest
import torch

from analysis.spectral.logits import clip_factors, head_stats, logit_stats, term_bound
from models import GPT, AttentionConfig, GPTConfig
from models.config import ConfigError

VARIANTS = ["mha", "gqa", "mla", "mla_prerope", "kv_shift", "mla_kv_shift"]
MLA = {"mla", "mla_prerope", "mla_kv_shift"}


def model(name: str, q_lora_rank: int = 0, bias: bool = False, qk_norm: bool = False, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=300, block_size=32, n_layer=2, d_model=64, n_head=4, bias=bias, qk_norm=qk_norm,
                    attention=AttentionConfig(name=name, n_kv_head=2 if name == "gqa" else None,
                                              q_lora_rank=q_lora_rank, kv_lora_rank=24))
    return GPT(cfg)


def configurations() -> list[tuple[str, int, bool, bool]]:
    out = [(name, 0, bias, False) for name in VARIANTS for bias in (False, True)]
    out += [(name, 32, False, False) for name in MLA]
    out += [(name, 0, False, True) for name in ("mha", "gqa", "kv_shift")]
    return out


def trained(m: GPT, steps: int = 25, lr: float = 3e-2) -> GPT:
    """A few AdamW steps at a high learning rate on random tokens: weights with grown, aligned logits."""
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 300, (8, 32), generator=g)
        _, loss = m(idx, idx.roll(-1, dims=1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


@pytest.mark.parametrize(("name", "q_lora_rank", "bias", "qk_norm"), configurations())
def test_bound_holds_on_random_and_trained_weights(name: str, q_lora_rank: int, bias: bool, qk_norm: bool) -> None:
    m = model(name, q_lora_rank, bias, qk_norm)
    with torch.no_grad():  # random gains, shift weights and biases far from their init
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(-2.0, 2.0)
    idx = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    for weights in ("random", "trained"):
        if weights == "trained":
            trained(m)
        stats = logit_stats(m.attention_scores(idx), m.logit_terms())
        assert (stats.max_logit > 0).all()
        assert (stats.max_logit <= stats.bound * (1 + 1e-5)).all(), (weights, stats.max_logit / stats.bound)


def test_term_bound_equals_dense_maximum_over_offsets() -> None:
    """s₁ of the d x d form query_h R_nᵀ key_hᵀ, formed densely at every offset n, maximised over n."""
    m = model("mha")
    attn = m.blocks[0].attn
    (term,) = attn.logit_terms(m.blocks[0].attn_norm.weight)
    dense = []
    for n in range(term.rotary_cos.shape[0]):
        rotated = attn.rotary(term.query.unsqueeze(-2), n).squeeze(-2)  # (H, C, r): each row rotated by n
        dense.append(torch.linalg.matrix_norm(rotated @ term.key.transpose(1, 2), ord=2))  # of (H, C, C)
    expected = torch.stack(dense).amax(dim=0) * term.scale * term.query_norm * term.key_norm
    torch.testing.assert_close(term_bound(term), expected, rtol=1e-4, atol=0)


def test_bound_is_attained_without_rotation() -> None:
    """Without RoPE the bound is tight: inputs along the top singular pair of the form reach it."""
    m = model("mla")
    attn = m.blocks[0].attn
    content = attn.logit_terms(m.blocks[0].attn_norm.weight)[0]  # no rotary
    form = content.query[0] @ content.key[0].transpose(0, 1)  # (n_q, n_k)
    u, _, vh = torch.linalg.svd(form)
    x_q, x_k = u[:, 0] * content.query_norm, vh[0] * content.key_norm
    logit = (x_q @ form @ x_k) * content.scale
    torch.testing.assert_close(logit.abs(), term_bound(content)[0], rtol=1e-4, atol=0)


def test_head_stats_max_and_entropy() -> None:
    scores = torch.tensor([[[[0.0, float("-inf")], [3.0, -5.0]]]])  # (1, 1, 2, 2)
    max_logit, entropy = head_stats(scores)
    assert max_logit.tolist() == [5.0]
    p = torch.softmax(torch.tensor([3.0, -5.0]), 0)
    torch.testing.assert_close(entropy, (-(p * p.log()).sum() / 2).reshape(1))  # row 0 has entropy 0


@pytest.mark.parametrize("name", VARIANTS)
def test_qk_clip_below_tau_is_exact_noop_and_clipped_heads_reach_tau(name: str) -> None:
    m = trained(model(name, q_lora_rank=32 if name in MLA else 0))
    idx = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    stats = logit_stats(m.attention_scores(idx), m.logit_terms())
    m.clip_qk_(clip_factors(stats.max_logit, float(stats.max_logit.max()) + 1.0))  # every head below tau
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())

    last = stats.max_logit[-1]  # clip in the last layer: the inputs it reads stay the same
    tau = float(last.median())
    eta = torch.ones_like(stats.max_logit)
    eta[-1] = clip_factors(last, tau)
    assert (eta[-1] < 1).any() and (eta[-1] == 1).any()
    m.clip_qk_(eta)
    after = logit_stats(m.attention_scores(idx), m.logit_terms())
    clipped = eta < 1
    assert (after.max_logit[-1] <= tau * (1 + 1e-4)).all()
    torch.testing.assert_close(after.max_logit[clipped], torch.full_like(after.max_logit[clipped], tau), rtol=1e-4,
                               atol=0)
    if name != "gqa":  # GQA's shared key heads: a head of a clipped group may change
        torch.testing.assert_close(after.max_logit[~clipped], stats.max_logit[~clipped], rtol=1e-5, atol=0)


def test_qk_norm_bounds_logits_by_its_gains_and_is_refused_for_mla() -> None:
    plain, normed = model("mha"), model("mha", qk_norm=True)
    assert not any("q_norm" in k for k in plain.state_dict())
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= set(normed.state_dict())
    idx = torch.randint(0, 300, (4, 32))
    stats = logit_stats(trained(normed, lr=1e-1).attention_scores(idx), normed.logit_terms())
    attn = normed.blocks[0].attn
    gain_bound = (attn.q_norm.weight.abs().max() * attn.k_norm.weight.abs().max()).item() * attn.head_dim**0.5
    assert float(stats.bound[0].max()) <= float(gain_bound) * (1 + 1e-5)
    for name in sorted(MLA):
        with pytest.raises(ConfigError, match=rf"model.qk_norm=true is not available with attention={name}"):
            model(name, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        normed.clip_qk_(torch.full((2, 4), 0.5))
