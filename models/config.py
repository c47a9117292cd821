"""Model and attention configuration: plain dataclasses that validate themselves.

Hydra registers these as structured-config schemas (trainer/config.py), so a wrong type
fails at composition; the cross-field checks below run when the config is turned into
objects (`OmegaConf.to_object`) and name the offending key and its allowed values.
"""

from dataclasses import dataclass, field
from enum import Enum


class AttentionName(str, Enum):
    """The attention variants a model can be built with."""

    mha = "mha"
    gqa = "gqa"
    mla = "mla"
    mla_prerope = "mla_prerope"
    kv_shift = "kv_shift"
    mla_kv_shift = "mla_kv_shift"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _require_positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} is invalid: it must be > 0")


@dataclass
class AttentionConfig:
    """Which attention variant, and its dimensions (MLA names follow HF/DeepSeek)."""

    name: AttentionName = AttentionName.mha
    n_kv_head: int | None = None  # GQA key/value heads; None means n_head (MHA)
    q_lora_rank: int = 0  # MLA query latent d_c'; 0 = no query compression (V2-Lite)
    kv_lora_rank: int = 0  # MLA key/value latent d_c
    qk_nope_head_dim: int = 0  # MLA per-head content query/key dim; 0 = d_model / n_head
    qk_rope_head_dim: int = 0  # MLA decoupled rotary dim; 0 = d_head / 2
    v_head_dim: int = 0  # MLA per-head value dim; 0 = d_model / n_head

    @property
    def is_mla(self) -> bool:
        return self.name in (AttentionName.mla, AttentionName.mla_prerope, AttentionName.mla_kv_shift)


@dataclass
class GPTConfig:
    """A decoder-only transformer: pre-norm RMSNorm blocks, RoPE, SwiGLU or GELU MLP."""

    vocab_size: int = 2048  # set from the trained tokenizer at run time
    block_size: int = 128  # context length in tokens
    n_layer: int = 4  # transformer blocks
    d_model: int = 128  # residual stream width
    n_head: int = 4  # query heads
    d_ff: int = 0  # MLP hidden width; 0 = 8/3 d_model rounded to 64 (SwiGLU) or 4 d_model (GELU)
    mlp: str = "swiglu"  # "swiglu" or "gelu"
    dropout: float = 0.0  # dropout on attention output and MLP output
    bias: bool = False  # biases in linear layers
    tie_embeddings: bool = True  # share the token embedding with the output head
    rope_base: float = 10000.0  # RoPE frequency base
    norm_eps: float = 1e-6  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    qk_norm: bool = False  # RMSNorm on every head's query and key (MHA, GQA, KV shifting; not MLA)
    attention: AttentionConfig = field(default_factory=AttentionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        self.attention.name = AttentionName(self.attention.name)
        for key in ("vocab_size", "block_size", "n_layer", "d_model", "n_head"):
            _require_positive(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}; "
                f"allowed n_head for d_model={self.d_model}: {_divisors(self.d_model)}"
            )
        if self.mlp not in ("swiglu", "gelu"):
            raise ConfigError(f"model.mlp={self.mlp!r} is invalid; allowed: ['swiglu', 'gelu']")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} is invalid; allowed: 0 <= dropout < 1")
        for key in ("rope_base", "norm_eps", "init_std"):
            if not getattr(self, key) > 0:  # also rejects NaN
                raise ConfigError(f"model.{key}={getattr(self, key)} is invalid: it must be > 0")
        if self.d_ff < 0:
            raise ConfigError(f"model.d_ff={self.d_ff} is invalid: it must be >= 0 (0 = default)")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 64 * -(-(8 * self.d_model // 3) // 64)
        self._check_attention()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def _check_attention(self) -> None:
        a = self.attention
        if a.n_kv_head is None:
            a.n_kv_head = self.n_head
        if a.n_kv_head <= 0 or self.n_head % a.n_kv_head:
            raise ConfigError(
                f"model.attention.n_kv_head={a.n_kv_head} does not divide model.n_head={self.n_head}; "
                f"allowed: {_divisors(self.n_head)}"
            )
        if a.name == AttentionName.mha and a.n_kv_head != self.n_head:
            raise ConfigError(
                f"model.attention.n_kv_head={a.n_kv_head} with attention=mha; MHA needs n_kv_head=n_head="
                f"{self.n_head} (use attention=gqa for grouped keys/values)"
            )
        if not a.is_mla:
            return
        if self.qk_norm:
            raise ConfigError(
                f"model.qk_norm=true is not available with attention={a.name.value}: MLA's absorbed decoding "
                "never forms per-head keys to normalise; allowed with mha, gqa, kv_shift. For MLA bound the "
                "logits with QK-Clip instead (qk_clip=on)"
            )
        if a.qk_nope_head_dim == 0:
            a.qk_nope_head_dim = self.head_dim
        if a.v_head_dim == 0:
            a.v_head_dim = self.head_dim
        if a.qk_rope_head_dim == 0:
            a.qk_rope_head_dim = max(2, self.head_dim // 2)
        if a.kv_lora_rank == 0:
            a.kv_lora_rank = 4 * self.head_dim
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"):
            _require_positive(f"model.attention.{key}", getattr(a, key))
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(a, key) > self.d_model:
                raise ConfigError(f"model.attention.{key}={getattr(a, key)} exceeds model.d_model={self.d_model}; "
                                  f"allowed: 1..{self.d_model} per head")
        if a.qk_rope_head_dim % 2:
            raise ConfigError(f"model.attention.qk_rope_head_dim={a.qk_rope_head_dim} is invalid: it must be even")
        if a.q_lora_rank < 0:
            raise ConfigError(f"model.attention.q_lora_rank={a.q_lora_rank} is invalid: it must be >= 0 (0 = off)")
        for key in ("kv_lora_rank", "q_lora_rank"):
            if getattr(a, key) > self.d_model:
                raise ConfigError(
                    f"model.attention.{key}={getattr(a, key)} exceeds model.d_model={self.d_model}; "
                    f"a latent must be a compression: allowed 1..{self.d_model}"
                )
