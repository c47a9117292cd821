"""KV shifting: reduces to its base attention at α = β = (1, 0), shifts by exactly one token,
initialises as the paper does, decodes from fixed-size state, and reports α, β in the probe."""

import pytest
import torch

from models import GPT, GPTConfig
from models.gpt import KVCache
from models.kv_shift import shift
from tests.test_attention_variants import decode_logits, make_model

PAIRS = [  # (shifted variant, its base)
    ({"name": "kv_shift"}, {"name": "mha"}),
    ({"name": "kv_shift", "n_kv_head": 2}, {"name": "gqa", "n_kv_head": 2}),
    ({"name": "mla_kv_shift"}, {"name": "mla"}),
    ({"name": "mla_kv_shift", "q_lora_rank": 32}, {"name": "mla", "q_lora_rank": 32}),
]


def set_shift(model: GPT, alpha: tuple[float, float], beta: tuple[float, float]) -> GPT:
    with torch.no_grad():
        for block in model.blocks:
            for name, value in zip(("alpha1", "alpha2", "beta1", "beta2"), (*alpha, *beta), strict=True):
                getattr(block.attn, name).fill_(value)
    return model


@pytest.mark.parametrize(("shifted", "base"), PAIRS, ids=lambda a: "-".join(map(str, a.values())))
def test_identity_shift_equals_base_attention(shifted: dict, base: dict) -> None:
    """α = (1, 0), β = (1, 0) with the base's weights copied in: the same logits, exactly."""
    m = set_shift(make_model(shifted), (1.0, 0.0), (1.0, 0.0))
    ref = make_model(base, seed=1)
    missing, unexpected = ref.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(k.rsplit(".", 1)[-1] in ("alpha1", "alpha2", "beta1", "beta2") for k in unexpected)
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(idx)[0], ref(idx)[0])
        # the decode paths too (absorbed for MLA), up to float rounding
        diff = (decode_logits(m, idx, [10] + [1] * 14) - decode_logits(ref, idx, [10] + [1] * 14)).abs().max()
    assert diff < 1e-5


def test_shift_moves_one_step_and_continues_from_prev() -> None:
    x = torch.arange(6.0).view(1, 1, 3, 2)  # (B, G, T, d)
    assert torch.equal(shift(x), torch.tensor([[[[0.0, 0.0], [0.0, 1.0], [2.0, 3.0]]]]))
    prev = torch.full((1, 1, 1, 2), 9.0)
    assert torch.equal(shift(x, prev)[..., 0, :], prev[..., 0, :])


def test_previous_key_weight_gives_the_previous_token_key() -> None:
    """α = (0, 1): the key at position j is token j-1's projected key (zero at position 0)."""
    m = set_shift(make_model({"name": "kv_shift"}, n_layer=1), (0.0, 1.0), (1.0, 0.0))
    attn = m.blocks[0].attn
    x = torch.randn(1, 8, 64)
    k = attn.k_proj(x).view(1, 8, 4, 16).transpose(1, 2)
    k_hat, _ = attn.shift_kv(k, k, None)
    assert torch.equal(k_hat[:, :, 1:], k[:, :, :-1]) and torch.equal(k_hat[:, :, 0], torch.zeros_like(k[:, :, 0]))


@pytest.mark.parametrize("attention", [{"name": "kv_shift", "n_kv_head": 2}, {"name": "mla_kv_shift"}])
def test_init_follows_the_paper(attention: dict) -> None:
    """α1, β1 ~ U(0, 1) per key/value head; α2 = 1 - α1, β2 = 1 - β1; the GPT init leaves them alone."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=3, d_model=64, n_head=4, attention=attention))
    n = 2 if attention["name"] == "kv_shift" else 4
    for block in m.blocks:
        a = block.attn
        assert a.alpha1.shape == a.beta1.shape == (n,)
        assert torch.allclose(a.alpha1 + a.alpha2, torch.ones(n)) and torch.allclose(a.beta1 + a.beta2, torch.ones(n))
        assert ((a.alpha1 > 0) & (a.alpha1 < 1) & (a.beta1 > 0) & (a.beta1 < 1)).all()
        assert not torch.equal(a.alpha1, a.beta1)


def test_decode_state_is_fixed_size() -> None:
    """The previous token's unshifted k, v: (B, G, 1, d_head), whatever the length decoded."""
    m = make_model({"name": "kv_shift", "n_kv_head": 2})
    cache = KVCache(2)
    idx = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        m(idx[:, :7], cache=cache)
        for t in range(7, 12):
            m(idx[:, t : t + 1], cache=cache)
    layer = cache.layers[0]
    assert layer.get("k_last").shape == layer.get("v_last").shape == (3, 2, 1, 16)
    assert layer.get("k").shape == (3, 2, 12, 16)


@pytest.mark.parametrize("attention", [{"name": "kv_shift", "n_kv_head": 2}, {"name": "mla_kv_shift"}])
def test_probe_meta_carries_shift_weights(attention: dict) -> None:
    m = make_model(attention)
    attn = m.blocks[0].attn
    factors = m.qk_factors()[0]
    n = attn.alpha1.numel()
    for f in factors:
        assert all(isinstance(v, float) for v in f.meta.values())
        for name in ("alpha1", "alpha2", "beta1", "beta2"):
            values = getattr(attn, name).tolist()
            assert [f.meta[f"{name}_h{i}"] for i in range(n)] == pytest.approx(values)
            assert f.meta[f"{name}_mean"] == pytest.approx(sum(values) / n)


def test_gradients_reach_shift_weights() -> None:
    m = make_model({"name": "mla_kv_shift"}).train()
    idx = torch.randint(0, 64, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    for name in ("alpha1", "alpha2", "beta1", "beta2"):
        g = getattr(m.blocks[0].attn, name).grad
        assert g is not None and g.abs().sum() > 0
