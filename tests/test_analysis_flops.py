"""Analytic FLOP counts (analysis/study/flops.py) against torch's FLOP counter on a meta-device model."""

import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops

from analysis.study.flops import attention_dims, forward_flops_per_token, train_flops_per_batch
from models import GPT, GPTConfig

VARIANTS = [
    {"name": "mha"},
    {"name": "gqa", "n_kv_head": 2},
    {"name": "kv_shift"},
    {"name": "mla"},
    {"name": "mla", "q_lora_rank": 48},
    {"name": "mla_prerope"},
    {"name": "mla_kv_shift"},
]


@pytest.mark.parametrize("attention", VARIANTS, ids=lambda a: "-".join(f"{v}" for v in a.values()))
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_analytic_train_flops_match_the_flop_counter(attention: dict, mlp: str) -> None:
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=2, d_model=128, n_head=4, mlp=mlp,
                       attention=dict(attention))
    B, T = 2, 64
    with torch.device("meta"):
        model = GPT(config)
        x = torch.randint(0, config.vocab_size, (B, T))
    measured = measure_flops(model, lambda: model(x, x)[1], loss_fn=torch.Tensor.sum)
    d_qk, d_v = attention_dims(config)
    padding = 3 * B * T * config.n_layer * 2 * T * config.n_head * (d_qk - d_v)  # MLA pads values to d_qk
    analytic = train_flops_per_batch(config, B, T)
    assert analytic + padding == pytest.approx(measured, rel=1e-6)


def test_mla_attention_cost_uses_latent_dims() -> None:
    """At a long context the score/value products dominate: MLA's cost follows d_nope + d_rope, d_v."""
    mha = GPTConfig(d_model=256, n_head=8)
    mla = GPTConfig(d_model=256, n_head=8, attention={"name": "mla", "qk_nope_head_dim": 64, "v_head_dim": 64})
    ctx = 1 << 20
    ratio = forward_flops_per_token(mla, ctx) / forward_flops_per_token(mha, ctx)
    assert ratio == pytest.approx((64 + 16 + 64) / (32 + 32), rel=1e-3)
