"""Analytic FLOP counts of the decoder for every attention variant (the PaLM/Chinchilla method).

A matrix multiply of an (m × k) by a (k × n) matrix costs 2mkn FLOPs. Per token, the forward pass
costs 2 × (number of weights in the projections it multiplies through) plus the attention
products, whose cost grows with the context: scores q·k over S keys cost 2·S·d_qk per head, the
weighted sum of values 2·S·d_v per head. Training costs 3x the forward pass (the backward pass
computes gradients of activations and of weights, 2x). Elementwise work (norms, RoPE, softmax,
the KV-shift mix) is left out, as in Kaplan et al. 2020 §2.1 and Chowdhery et al. 2022 App. B.

Attention is counted over the full T × T score matrix, not the causal half, which is what
`torch.utils.flop_counter` (hence Lightning's `measure_flops`) counts for
`scaled_dot_product_attention`; the two counts therefore agree and can be compared. One
difference is by design: the MLA training path zero-pads values from d_v to d_nope + d_rope so
SDPA's fused kernels apply (models/mla.py `padded_attention`); the counter sees those
multiplications by zero, the model-FLOP count here does not (MFU counts useful work).
"""

from models.config import AttentionName, GPTConfig


def projection_weights_per_layer(config: GPTConfig) -> int:
    """Weights an attention layer multiplies each token through (training path), by variant.

    MHA/GQA/KV-shift: W_Q (C × H·d_h), W_K, W_V (C × G·d_h each), W_O (H·d_h × C).
    MLA (DeepSeek-V2): q_proj C × H(d_nope + d_rope) (or q_a_proj + q_b_proj with a query latent),
    kv_a_proj_with_mqa C × (d_c + d_rope), kv_b_proj d_c × H(d_nope + d_v), o_proj H·d_v × C.
    MLA-PreRoPE: as MLA without the decoupled rotary parts.
    """
    a, C, H, dh = config.attention, config.d_model, config.n_head, config.head_dim
    if not a.is_mla:
        return C * H * dh + 2 * C * a.n_kv_head * dh + H * dh * C
    dr = 0 if a.name == AttentionName.mla_prerope else a.qk_rope_head_dim
    q_out = H * (a.qk_nope_head_dim + dr)
    query = C * q_out if a.q_lora_rank == 0 else C * a.q_lora_rank + a.q_lora_rank * q_out
    up = a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
    return query + C * (a.kv_lora_rank + dr) + up + H * a.v_head_dim * C


def attention_dims(config: GPTConfig) -> tuple[int, int]:
    """(d_qk, d_v) per head: the widths of the score and value products."""
    a = config.attention
    if not a.is_mla:
        return config.head_dim, config.head_dim
    dr = 0 if a.name == AttentionName.mla_prerope else a.qk_rope_head_dim
    return a.qk_nope_head_dim + dr, a.v_head_dim


def mlp_weights_per_layer(config: GPTConfig) -> int:
    """SwiGLU: three C × d_ff matrices (gate, up, down); GELU: two."""
    return (3 if config.mlp == "swiglu" else 2) * config.d_model * config.d_ff


def forward_flops_per_token(config: GPTConfig, context: int) -> int:
    """Forward FLOPs of one token attending over `context` keys:
    2·[L·(attention projections + MLP) + C·V] + L·2·context·H·(d_qk + d_v)."""
    d_qk, d_v = attention_dims(config)
    weights = config.n_layer * (projection_weights_per_layer(config) + mlp_weights_per_layer(config))
    weights += config.d_model * config.vocab_size  # the output head (tied or not, it is multiplied)
    return 2 * weights + config.n_layer * 2 * context * config.n_head * (d_qk + d_v)


def train_flops_per_batch(config: GPTConfig, batch_size: int, block_size: int) -> int:
    """FLOPs of one training step on a (batch_size, block_size) batch: 3x the forward pass."""
    return 3 * batch_size * block_size * forward_flops_per_token(config, block_size)
