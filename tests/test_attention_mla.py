"""MLA, MLA-PreRoPE and MLA + KV shifting: absorbed decoding equals the naive path, the QK probe
equals the module's scores, and MLA equals Hugging Face's DeepSeek attention on copied weights."""

import math

import pytest
import torch

from models import GPT, GPTConfig
from models.mla import MultiHeadLatentAttention
from tests.test_attention_variants import decode_logits, make_model, scramble

MLA_VARIANTS = {
    "mla": {"name": "mla"},
    "mla_qlora": {"name": "mla", "q_lora_rank": 32},
    "mla_kv_shift": {"name": "mla_kv_shift"},
    "mla_kv_shift_qlora": {"name": "mla_kv_shift", "q_lora_rank": 32},
}


@pytest.mark.parametrize("variant", list(MLA_VARIANTS))
def test_absorbed_decode_equals_naive(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill 8, decode 1 token at a time then a chunk of 5: absorbed and latent-up-projection
    decoding both equal the naive full forward; the absorbed path really ran."""
    m = make_model(MLA_VARIANTS[variant])
    attn_cls = type(m.blocks[0].attn)
    method = "absorbed" if attn_cls is MultiHeadLatentAttention else "shifted_absorbed"
    calls = []
    original = getattr(attn_cls, method)
    monkeypatch.setattr(attn_cls, method, lambda self, *a: calls.append(1) or original(self, *a))
    idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    chunks = [8] + [1] * 11 + [5]
    with torch.no_grad():
        full = m(idx)[0]
        absorbed = decode_logits(m, idx, chunks)
        assert len(calls) == 12 * m.config.n_layer  # every decode step, not the prefill
        for block in m.blocks:
            block.attn.absorb = False
        up_projected = decode_logits(m, idx, chunks)
    d_abs, d_up = (absorbed - full).abs().max().item(), (up_projected - full).abs().max().item()
    print(f"{variant}: max |absorbed - naive| = {d_abs:.2e}, max |up-projected - naive| = {d_up:.2e}")
    assert d_abs < 2e-5 and d_up < 2e-5
    assert len(calls) == 12 * m.config.n_layer  # absorb=False never called it


def test_prerope_decode_equals_naive() -> None:
    """Rotated per-head keys cached, values through W_UV absorbed into the output."""
    for q_lora_rank in (0, 32):
        m = make_model({"name": "mla_prerope", "q_lora_rank": q_lora_rank})
        idx = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (decode_logits(m, idx, [8] + [1] * 11 + [5]) - m(idx)[0]).abs().max().item()
        print(f"mla_prerope q_lora_rank={q_lora_rank}: max |decode - naive| = {diff:.2e}")
        assert diff < 2e-5


def rms(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (z.pow(2).mean(-1) + eps).sqrt()


@pytest.mark.parametrize("q_lora_rank", [0, 32])
@pytest.mark.parametrize("name", ["mla", "mla_kv_shift"])
def test_mla_probe_reproduces_scores(name: str, q_lora_rank: int) -> None:
    """x^T A_h B_h^T y equals q_h(x) . k_h(y) at offset 0, times the 1/RMS scalars the probe leaves out."""
    m = make_model({"name": name, "q_lora_rank": q_lora_rank})
    attn = m.blocks[1].attn
    content, rope = attn.qk_factors()
    assert (content.kind, rope.kind) == ("content", "rope")
    assert content.left.shape == (4, 64, 16) and rope.left.shape == (4, 64, 8)
    assert content.meta["kv_lora_rank"] == 64.0 and content.meta["scale"] == pytest.approx(24**-0.5)
    x, y = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    with torch.no_grad():
        q_nope, q_rope = attn.query(x)  # (1, H, 1, dn), (1, H, 1, dr): offset 0, no rotation
        c_kv, k_rope = attn.latent(y)
        k_nope = attn.kv_b_proj(c_kv).view(4, 32)[:, :16]  # (H, dn)
        rms_q = rms(attn.q_a_proj(x)) if q_lora_rank else torch.ones(1, 1)
        rms_kv = rms(attn.kv_a_proj_with_mqa(y)[..., :64])
        content_score = (q_nope[0, :, 0] * k_nope).sum(-1) * rms_q * rms_kv  # (H,)
        rope_score = (q_rope[0, :, 0] * k_rope[0]).sum(-1) * rms_q
        probe = "i,hir,hjr,j->h"
        assert torch.allclose(torch.einsum(probe, x[0, 0], content.left, content.right, y[0, 0]),
                              content_score.flatten(), atol=1e-4)
        assert torch.allclose(torch.einsum(probe, x[0, 0], rope.left, rope.right, y[0, 0]),
                              rope_score.flatten(), atol=1e-4)


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_prerope_probe_reproduces_scores_at_offset_zero(q_lora_rank: int) -> None:
    m = make_model({"name": "mla_prerope", "q_lora_rank": q_lora_rank})
    attn = m.blocks[0].attn
    (f,) = attn.qk_factors()
    assert f.kind == "content" and f.left.shape == (4, 64, 16)
    x, y = torch.randn(64), torch.randn(64)
    with torch.no_grad():
        q = (attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))) if q_lora_rank else attn.q_proj(x)).view(4, 16)
        k = attn.kv_b_proj(attn.kv_a_layernorm(attn.kv_a_proj(y))).view(4, 32)[:, :16]
        rms_q = rms(attn.q_a_proj(x)) if q_lora_rank else 1.0
        expected = (q * k).sum(-1) * rms_q * rms(attn.kv_a_proj(y))
        probed = torch.einsum("i,hir,hjr,j->h", x, f.left, f.right, y)
    assert torch.allclose(probed, expected, atol=1e-4)


def rope_permutation(dr: int) -> torch.Tensor:
    """DeepSeek's interleaved pairs (x0, x1), (x2, x3), ... read as our rotate-half halves."""
    return torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])


def to_interleaved(w: torch.Tensor, block: int, offset: int, dr: int) -> torch.Tensor:
    """Rows offset..offset+dr of every `block` rows of w, laid out as DeepSeek's interleaved pairs."""
    w = w.clone().view(-1, block, w.shape[-1])
    rope = w[:, offset : offset + dr].clone()
    w[:, offset + rope_permutation(dr)] = rope
    return w.view(-1, w.shape[-1])


@pytest.mark.parametrize("q_lora_rank", [0, 32])
@pytest.mark.parametrize("reference", ["v3", "v3_interleaved", "v2"])
def test_mla_matches_hugging_face_deepseek(reference: str, q_lora_rank: int) -> None:
    """Our MLA vs transformers' DeepseekV3Attention / DeepseekV2Attention on the same weights.

    HF's V2 (complex multiplication) and V3 with rope_interleave=True rotate interleaved pairs;
    ours rotates halves (Llama convention), so for those the rotary rows of q and W_KR are
    permuted when copied (the scores are invariant to a permutation shared by q and k).
    """
    transformers = pytest.importorskip("transformers")
    C, H, T = 64, 4, 20
    ours = make_model({"name": "mla", "q_lora_rank": q_lora_rank}, n_layer=1).blocks[0].attn
    scramble(ours, seed=5)
    a = GPTConfig(vocab_size=64, block_size=32, d_model=C, n_head=H, attention={"name": "mla"}).attention
    dn, dr, dv, dc = 16, 8, 16, 64
    kw = dict(hidden_size=C, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora_rank or None,
              kv_lora_rank=dc, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, attention_bias=False,
              max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
              rms_norm_eps=1e-6, attention_dropout=0.0)
    assert (a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank) == (dn, dr, dv, dc)
    if reference.startswith("v3"):
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

        config = transformers.DeepseekV3Config(**kw, rope_interleave=reference == "v3_interleaved")
        theirs, rotary = hf.DeepseekV3Attention(config, layer_idx=0), hf.DeepseekV3RotaryEmbedding(config)
    else:
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf

        config = transformers.DeepseekV2Config(**kw)
        theirs, rotary = hf.DeepseekV2Attention(config, layer_idx=0), hf.DeepseekV2RotaryEmbedding(config)
    config._attn_implementation = "eager"
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    if reference != "v3":
        q_name = "q_b_proj.weight" if q_lora_rank else "q_proj.weight"
        state[q_name] = to_interleaved(state[q_name], dn + dr, dn, dr)
        state["kv_a_proj_with_mqa.weight"] = to_interleaved(state["kv_a_proj_with_mqa.weight"], dc + dr, dc, dr)
    theirs.load_state_dict(state)
    x = torch.randn(2, T, C, generator=torch.Generator().manual_seed(7))
    position_embeddings = rotary(x, torch.arange(T)[None])
    mask = torch.full((T, T), -math.inf).triu(1)[None, None]  # additive causal mask for eager attention
    with torch.no_grad():
        expected = theirs(hidden_states=x, position_embeddings=position_embeddings, attention_mask=mask)[0]
        got = ours(x)
    diff = (got - expected).abs().max().item()
    print(f"HF {reference} q_lora_rank={q_lora_rank}: max |ours - HF| = {diff:.2e} "
          f"(output scale {expected.abs().max().item():.2f})")
    assert diff < 1e-5


def test_small_mla_config_defaults() -> None:
    """The 0 defaults give DeepSeek's ratios: d_c = 4 d_head, d_R = d_head / 2."""
    a = GPT(GPTConfig(vocab_size=64, d_model=256, n_head=8, n_layer=1, attention={"name": "mla"})).config.attention
    assert (a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim) == (128, 16, 32, 32)
