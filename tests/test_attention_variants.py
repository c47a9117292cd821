"""Every attention variant: decode equals full forward, cached generation, causality, cache bytes.

Weights are re-drawn at unit scale (`scramble`) so attention is far from uniform and every
norm gain and shift weight differs from its init: an equality that holds here is not luck.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import GPT, GPTConfig
from models.config import AttentionConfig, AttentionName
from models.gpt import ATTENTION, KVCache

CONF = Path(__file__).resolve().parents[1] / "conf" / "attention"

VARIANTS = {
    "mha": {"name": "mha"},
    "gqa": {"name": "gqa", "n_kv_head": 2},
    "mla": {"name": "mla"},
    "mla_qlora": {"name": "mla", "q_lora_rank": 32},
    "mla_prerope": {"name": "mla_prerope"},
    "mla_prerope_qlora": {"name": "mla_prerope", "q_lora_rank": 32},
    "kv_shift": {"name": "kv_shift"},
    "kv_shift_gqa": {"name": "kv_shift", "n_kv_head": 2},
    "mla_kv_shift": {"name": "mla_kv_shift"},
    "mla_kv_shift_qlora": {"name": "mla_kv_shift", "q_lora_rank": 32},
}


def scramble(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Unit-scale random weights: matrices ~ N(0, 1/fan_in), gains 1 + N(0, 0.3), shifts ~ N(0.5, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.split(".")[-1] in ("alpha1", "alpha2", "beta1", "beta2"):
                p.copy_(0.5 + 0.5 * torch.randn(p.shape, generator=g))
            else:  # RMSNorm gains and biases
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def make_model(attention: dict, seed: int = 0, **kw: object) -> GPT:
    """vocab 64, block 32, 2 layers, d_model 64, 4 heads (d_head 16), fp32, scrambled weights."""
    torch.manual_seed(seed)
    shape = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "d_model": 64, "n_head": 4, **kw}
    return scramble(GPT(GPTConfig(attention=dict(attention), **shape)), seed).eval()


def decode_logits(model: GPT, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of idx fed through one cache in pieces of the given lengths (prefill first)."""
    cache, out, t = KVCache(model.config.n_layer), [], 0
    for n in chunks:
        out.append(model(idx[:, t : t + n], cache=cache)[0])
        t += n
    return torch.cat(out, dim=1)


def test_every_variant_is_registered() -> None:
    assert set(ATTENTION) == set(AttentionName)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_logits_match_full_forward(variant: str) -> None:
    """Prefill 9 tokens, then one token at a time, then a chunk of 4: equals one full forward."""
    m = make_model(VARIANTS[variant])
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(idx)[0]
        diff = (decode_logits(m, idx, [9] + [1] * 7 + [4]) - full).abs().max().item()
    print(f"{variant}: max |decode - full| = {diff:.2e} (logit scale {full.abs().max().item():.1f})")
    assert diff < 2e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_generate_equals_recompute(variant: str) -> None:
    """Greedy decoding with and without the cache gives the same tokens, past block_size (32)."""
    m = make_model(VARIANTS[variant])
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with_cache = m.generate(idx, 32, temperature=0, use_cache=True)
    without = m.generate(idx, 32, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant: str) -> None:
    """Changing token t changes no output at positions < t (also through the shift), and does change t."""
    m = make_model(VARIANTS[variant])
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    for t in (0, 11, 23):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 64
        with torch.no_grad():
            a, b = m(idx)[0], m(changed)[0]
        assert torch.equal(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t], b[:, t])


def layer_cache_bytes(attention: dict, T: int, **shape: object) -> int:
    """Bytes of one layer's cache tensors after a prefill of T tokens (batch 1)."""
    torch.manual_seed(0)
    shape = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "d_model": 64, "n_head": 4, **shape}
    m = GPT(GPTConfig(attention=dict(attention), **shape)).eval()
    cache = KVCache(m.config.n_layer)
    with torch.no_grad():
        m(torch.zeros(1, T, dtype=torch.long), cache=cache)
    assert all(layer.nbytes() == cache.layers[0].nbytes() for layer in cache.layers)
    return cache.layers[0].nbytes()


def test_cache_bytes_per_token() -> None:
    """nbytes / T measured from the cache tensors (fp32): d_model 64, 4 heads of 16, d_c 64, d_R 8."""
    H, dh, dc, dr, T = 4, 16, 64, 8, 16

    def per_token(attention: dict) -> float:
        return layer_cache_bytes(attention, T) / T

    assert per_token({"name": "mha"}) == 2 * H * dh * 4
    assert per_token({"name": "gqa", "n_kv_head": 2}) == 2 * 2 * dh * 4
    assert per_token({"name": "mla"}) == (dc + dr) * 4
    assert per_token({"name": "mla", "q_lora_rank": 32}) == (dc + dr) * 4
    assert per_token({"name": "mla_kv_shift"}) == (dc + dr) * 4
    assert per_token({"name": "mla_prerope"}) == (H * dh + dc) * 4
    # KV shifting adds the previous token's unshifted k, v: fixed state, amortised over T
    assert per_token({"name": "kv_shift"}) == 2 * H * dh * 4 * (T + 1) / T


SMALL = {"n_layer": 6, "d_model": 256, "n_head": 8, "block_size": 64}  # conf/model/small.yaml
SMALL_VARIANTS = {
    "mha": {"name": "mha"},
    "gqa (n_kv_head 2)": {"name": "gqa", "n_kv_head": 2},
    "mla": {"name": "mla"},
    "mla_prerope": {"name": "mla_prerope"},
    "kv_shift": {"name": "kv_shift"},
    "mla_kv_shift": {"name": "mla_kv_shift"},
}


def test_cache_bytes_table_small_shape() -> None:
    """The README table for the small shape (d_head 32, d_c 128, d_R 16), fp32: per-token growth
    (the bytes added by T more tokens, / T) and the fixed per-sequence state, both per layer."""
    T = 16
    rows = {}
    for name, att in SMALL_VARIANTS.items():
        b1, b2 = layer_cache_bytes(att, T, **SMALL), layer_cache_bytes(att, 2 * T, **SMALL)
        rows[name] = ((b2 - b1) / T, b1 - (b2 - b1))
    mha = rows["mha"][0]
    print("\n| variant | elements/token/layer | bytes/token/layer (fp32) | ratio to MHA | fixed bytes/layer |")
    print("|---|---|---|---|---|")
    for name, (per_token, fixed) in rows.items():
        print(f"| {name} | {per_token / 4:g} | {per_token:g} | {per_token / mha:.3f} | {fixed:g} |")
    assert mha == 2 * 8 * 32 * 4 and rows["mla"] == ((128 + 16) * 4, 0)
    assert rows["mla_kv_shift"] == rows["mla"] and rows["kv_shift"] == (mha, mha)
    assert rows["mla_prerope"] == ((8 * 32 + 128) * 4, 0)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_attention_config_files_build_a_model(path: Path) -> None:
    """Each conf/attention file holds only AttentionConfig keys and builds its variant."""
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert set(cfg) <= set(AttentionConfig.__dataclass_fields__)
    assert cfg["name"] == path.stem
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, d_model=64, n_head=4, attention=cfg))
    assert isinstance(model.blocks[0].attn, ATTENTION[AttentionName(path.stem)])
