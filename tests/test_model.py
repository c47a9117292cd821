"""The decoder: shapes, causality, cached generation, and the QK probe against the module's math."""

import pytest
import torch

from models import GPT, GPTConfig
from models.config import AttentionName, ConfigError
from models.gpt import KVCache


def tiny(attention: dict | None = None, **kw: object) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=24, n_layer=2, d_model=48, n_head=4,
                    attention=attention or {"name": "mha"}, **kw)
    return GPT(cfg).eval()


VARIANTS = [{"name": "mha"}, {"name": "gqa", "n_kv_head": 2}, {"name": "gqa", "n_kv_head": 1}]


@pytest.mark.parametrize("attention", VARIANTS)
def test_shapes_and_loss(attention: dict) -> None:
    m = tiny(attention)
    idx = torch.randint(0, 97, (3, 24))
    logits, loss = m(idx, torch.randint(0, 97, (3, 24)))
    assert logits.shape == (3, 24, 97)
    assert loss.shape == () and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


@pytest.mark.parametrize("attention", VARIANTS)
def test_causal(attention: dict) -> None:
    """Changing token t changes no output at positions < t."""
    m = tiny(attention)
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    a, b = m(idx)[0], m(changed)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("attention", VARIANTS)
def test_cached_generate_equals_recompute(attention: dict) -> None:
    m = tiny(attention)
    idx = torch.randint(0, 97, (2, 5))
    # 30 new tokens run past block_size=24, exercising the cache rebuild
    with_cache = m.generate(idx, 30, temperature=0, use_cache=True)
    without = m.generate(idx, 30, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("attention", VARIANTS)
def test_decode_logits_match_full_forward(attention: dict) -> None:
    m = tiny(attention)
    idx = torch.randint(0, 97, (2, 16))
    full = m(idx)[0]
    cache = KVCache(m.config.n_layer)
    steps = [m(idx[:, :9], cache=cache)[0]] + [m(idx[:, t : t + 1], cache=cache)[0] for t in range(9, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("attention", VARIANTS)
def test_qk_probe_reproduces_attention_scores(attention: dict) -> None:
    """x^T A_h B_h^T y equals the module's q_h . k_g(h) for one token at offset 0 (no rotation)."""
    m = tiny(attention)
    attn = m.blocks[1].attn
    (f,) = attn.qk_factors()
    x, y = torch.randn(48), torch.randn(48)
    H, G, dh = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_proj(x).view(H, dh)
    k = attn.k_proj(y).view(G, dh).repeat_interleave(H // G, dim=0)
    expected = (q * k).sum(-1)  # (H,)
    probed = torch.einsum("i,hir,hjr,j->h", x, f.left, f.right, y)
    assert torch.allclose(probed, expected, atol=1e-5)
    assert f.left.shape == (4, 48, 12) and f.kind == "content"


def test_activation_form_of_mha_is_the_textbook_logit_matrix() -> None:
    """left_h right_hᵀ of a one-sequence batch is (R q_h)(R k_h)ᵀ / √d_h, q and k from the projections of the
    normed input, rotated by the rotate-half formula written here."""
    m = tiny()
    idx = torch.randint(0, 97, (1, 24))
    (f,) = m.activation_factors(idx)[0]
    attn = m.blocks[0].attn
    x = m.blocks[0].attn_norm(m.tok_emb(idx))[0]  # (T, C)
    q = attn.q_proj(x).view(24, 4, 12).transpose(0, 1)  # (H, T, dh)
    k = attn.k_proj(x).view(24, 4, 12).transpose(0, 1)
    angle = torch.arange(24.0)[:, None] / 10000 ** (torch.arange(0, 12, 2) / 12)  # (T, dh/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)

    def rope(v: torch.Tensor) -> torch.Tensor:
        return v * cos + torch.cat([-v[..., 6:], v[..., :6]], dim=-1) * sin

    expected = rope(q) @ rope(k).transpose(-1, -2) / 12**0.5  # (H, T, T)
    assert f.kind == "activation" and f.left.shape == (4, 24, 12)
    assert torch.allclose(f.left @ f.right.transpose(-1, -2), expected, atol=1e-5)


@pytest.mark.parametrize("name", [a.value for a in AttentionName])
def test_activation_form_holds_every_sequences_logits(name: str) -> None:
    """For every variant, the diagonal blocks of left_h right_hᵀ over a batch are the causal logits of each
    sequence, and the squared singular values are the eigenvalues of the pooled Grams' product."""
    m = tiny({"name": name})
    idx = torch.randint(0, 97, (2, 24))
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    for scores, (f,) in zip(m.attention_scores(idx), m.activation_factors(idx), strict=True):
        full = (f.left @ f.right.transpose(-1, -2)).double()  # (H, 48, 48)
        for b in range(2):
            block = full[:, 24 * b : 24 * (b + 1), 24 * b : 24 * (b + 1)]
            assert torch.allclose(block[:, causal].float(), scores[b][:, causal], atol=1e-5)
        sv2 = torch.linalg.svdvals(full)[:, : f.rank] ** 2
        gram = (f.left.double().mT @ f.left.double()) @ (f.right.double().mT @ f.right.double())  # (H, r, r)
        eig = torch.linalg.eigvals(gram).real.sort(dim=-1, descending=True).values
        assert torch.allclose(sv2, eig, rtol=1e-6, atol=1e-9)


def test_tied_embeddings_share_storage() -> None:
    m = tiny()
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    assert tiny(tie_embeddings=False).lm_head.weight.data_ptr() != tiny().tok_emb.weight.data_ptr()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 256, "n_head": 5}, "model.n_head=5 does not divide model.d_model=256"),
        ({"attention": {"name": "gqa", "n_kv_head": 3}}, "model.attention.n_kv_head=3"),
        ({"n_layer": -1}, "model.n_layer=-1"),
        ({"mlp": "relu"}, "allowed: ['swiglu', 'gelu']"),
    ],
)
def test_invalid_model_config_names_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GPTConfig(**{"vocab_size": 97, **kwargs})
