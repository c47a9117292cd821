"""The standard decoder-only transformer, in one file: read this to see how MHA/GQA is built.

Pre-norm blocks (RMSNorm), rotary positions inside the attention, SwiGLU or GELU MLP,
optionally tied input/output embeddings; `generate()` decodes with a per-layer cache. The
attention of every block is a configuration choice: `ATTENTION` maps a variant's name to its
class. MHA and GQA are defined here; models/mla.py (the MLA family) and models/kv_shift.py
(KV shifting) register theirs on import, reusing the pieces below.
"""

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.config import AttentionName, GPTConfig
from models.kernels import RMSNormFunction, RotaryFunction, rotate
from models.probe import LogitTerm, QKFactors, input_factor

# ----------------------------------------------------------------------------- normalisation


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, learnable gain g initialised to 1 (Zhang & Sennrich 2019).

    CUDA uses PyTorch's fused F.rms_norm kernel; CPU uses the hand-written backward above.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# ----------------------------------------------------------------------------- positions and masks


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021), rotate-half convention as in Llama/DeepSeek: cos/sin tables for
    `dim` rotary channels up to `max_len` positions."""

    def __init__(self, dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_len, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_len, dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.register_buffer("sin_signed", torch.cat([-freqs.sin(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x of shape (..., T, dim) as positions start .. start+T-1."""
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:
            raise ValueError(f"position {start + T} exceeds the rotary table ({self.cos.shape[0]})")
        cos, sin = self.cos[start : start + T].to(x.dtype), self.sin_signed[start : start + T].to(x.dtype)
        if torch.compiler.is_compiling():  # inductor fuses the formula into one pass each way
            return rotate(x, cos, sin)
        return RotaryFunction.apply(x, cos, sin)


def causal_mask(Tq: int, Tk: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: the Tq queries are the last Tq of the Tk positions
    (bottom-right aligned), so query i sees keys j <= i + Tk - Tq."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal scaled dot-product attention where the Tq queries are the last Tq of the Tk keys.

    q: (B, H, Tq, d_qk), k: (B, H, Tk, d_qk), v: (B, H, Tk, d_v) -> (B, H, Tq, d_v).
    Training and prefill (Tq == Tk) use SDPA's fused causal path; one-token decode needs no
    mask; chunked decode uses the bottom-right aligned causal mask.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device), scale=scale)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, T, d) -> (B, G * n_rep, T, d): each key/value head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, G, T, d = x.shape
    return x[:, :, None].expand(B, G, n_rep, T, d).reshape(B, G * n_rep, T, d)


# ----------------------------------------------------------------------------- decode-time cache


class LayerCache:
    """Named tensors of one attention layer, grown along their time axis during decoding.

    MHA/GQA store "k" and "v"; MLA stores only its latent and the shared rotary key; KV
    shifting adds the previous token's unshifted key/value as fixed-size state.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def extend(self, name: str, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Append x along `dim` to the stored tensor `name`; return the full tensor."""
        if name in self.tensors:
            x = torch.cat([self.tensors[name], x], dim=dim)
        self.tensors[name] = x
        return x

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def put(self, name: str, x: torch.Tensor) -> None:
        """Store fixed-size state (not grown per token), e.g. the last unshifted key."""
        self.tensors[name] = x

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class KVCache:
    """One LayerCache per block plus the number of positions already processed."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]
        self.length = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# ----------------------------------------------------------------------------- attention

ATTENTION: dict[AttentionName, type[nn.Module]] = {}


def register_attention(*names: AttentionName) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: build blocks with this attention class when model.attention.name is one of `names`."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        for name in names:
            ATTENTION[name] = cls
        return cls

    return register


@register_attention(AttentionName.mha, AttentionName.gqa)
class GroupedQueryAttention(nn.Module):
    """Multi-head and grouped-query attention (Vaswani et al. 2017; Ainslie et al. 2023).

    MHA is the case n_kv_head == n_head. Query head h reads key/value head g(h) = h // (H / G).
    With `qk_norm` every head's query and key are RMS-normalised (one gain of width d_head each,
    shared by the heads, as in OLMo 2 and Qwen3) before RoPE: the logit is then bounded by the
    gains alone, whatever the projection weights grow to (Wortsman et al. 2023, arXiv 2309.14322).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.attention.n_kv_head
        self.head_dim = config.head_dim
        C, H, G, dh = config.d_model, self.n_head, self.n_kv_head, self.head_dim
        self.q_proj = nn.Linear(C, H * dh, bias=config.bias)
        self.k_proj = nn.Linear(C, G * dh, bias=config.bias)
        self.v_proj = nn.Linear(C, G * dh, bias=config.bias)
        self.o_proj = nn.Linear(H * dh, C, bias=config.bias)
        self.rotary = RotaryEmbedding(dh, config.block_size, config.rope_base)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config.norm_eps)  # per-head query norm, gain shared by the heads
            self.k_norm = RMSNorm(dh, config.norm_eps)  # per-head key norm

    def shift_kv(
        self, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook between projection and RoPE; plain attention leaves k, v as they are."""
        return k, v

    def project(
        self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> rotated q (B, H, T, dh) and the (cached) k, v (B, G, S, dh)."""
        B, T, _ = x.shape
        H, G, dh = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)  # (B, H, T, dh)
        k = self.k_proj(x).view(B, T, G, dh).transpose(1, 2)  # (B, G, T, dh)
        v = self.v_proj(x).view(B, T, G, dh).transpose(1, 2)  # (B, G, T, dh)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        k, v = self.shift_kv(k, v, cache)
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k = cache.extend("k", k, dim=2)  # (B, G, start+T, dh)
            v = cache.extend("v", v, dim=2)
        return q, k, v

    def forward(self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G = self.n_head, self.n_kv_head
        q, k, v = self.project(x, start, cache)
        y = causal_attention(q, repeat_kv(k, H // G), repeat_kv(v, H // G))  # (B, H, T, dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Every head's rotated queries and keys of x (B, T, C) attending to itself, and the softmax
        scale: the logits are (q @ kᵀ) * scale. -> (B, H, T, dh), (B, H, T, dh), scale."""
        q, k, _ = self.project(x)
        return q, repeat_kv(k, self.n_head // self.n_kv_head), self.head_dim**-0.5

    def key_mix(self) -> torch.Tensor:
        """(H,) absolute sum of the weights of the keys mixed into one key: 1 without a shift."""
        return torch.ones(self.n_head, device=self.q_proj.weight.device)

    def logit_terms(self, input_gain: torch.Tensor) -> list[LogitTerm]:
        """The logit as one term: q_h^T R k_h with q, k projections of the normed input (gain
        `input_gain`), or, with qk_norm, of the per-head normalised q, k (norm sqrt(d_head))."""
        H, G, dh = self.n_head, self.n_kv_head, self.head_dim
        if self.qk_norm:
            eye = torch.eye(dh, device=self.q_norm.weight.device)
            query, key = ((eye * n.weight).expand(H, dh, dh) for n in (self.q_norm, self.k_norm))
            query_norm = key_norm = dh**0.5
        else:
            query, query_norm = input_factor(self.q_proj.weight, H, input_gain, self.q_proj.bias)
            key, key_norm = input_factor(self.k_proj.weight, G, input_gain, self.k_proj.bias)
            key = key.repeat_interleave(H // G, dim=0)  # (H, C, dh)
        return [LogitTerm(query, key, query_norm, key_norm, dh**-0.5, self.key_mix(),
                          self.rotary.cos, self.rotary.sin)]

    @torch.no_grad()
    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale head h's logits by eta_h <= 1 through its query and key weights (QK-Clip).

        A key head serves H/G query heads, so it takes sqrt of the smallest eta of its group and
        each query head the rest: the product is exactly eta_h, and eta = 1 changes nothing.
        """
        if self.qk_norm:
            raise ValueError("qk_clip cannot act on a model with model.qk_norm=true: the norms undo any weight scaling")
        H, G = self.n_head, self.n_kv_head
        k_scale = eta.view(G, H // G).amin(dim=1).sqrt()  # (G,)
        q_scale = eta / k_scale.repeat_interleave(H // G)  # (H,)
        for proj, scale, n in ((self.q_proj, q_scale, H), (self.k_proj, k_scale, G)):
            proj.weight.view(n, -1, proj.weight.shape[1]).mul_(scale.to(proj.weight.dtype)[:, None, None])
            if proj.bias is not None:
                proj.bias.view(n, -1).mul_(scale.to(proj.bias.dtype)[:, None])

    def qk_factors(self) -> list[QKFactors]:
        """A_h = W_Q^h^T, B_h = W_K^{g(h)}^T, each (d_model, d_head); RoPE at offset 0."""
        H, G, dh = self.n_head, self.n_kv_head, self.head_dim
        wq = self.q_proj.weight.view(H, dh, -1)  # (H, dh, C)
        wk = self.k_proj.weight.view(G, dh, -1).repeat_interleave(H // G, dim=0)  # (H, dh, C)
        meta = {"scale": dh**-0.5, "n_kv_head": float(G)}
        return [QKFactors(wq.transpose(1, 2), wk.transpose(1, 2), "content", meta)]


def build_attention(config: GPTConfig) -> nn.Module:
    """Instantiate the attention variant named by config.attention.name."""
    name = config.attention.name
    if name not in ATTENTION:
        raise NotImplementedError(f"attention={name.value} has no implementation registered")
    return ATTENTION[name](config)


# ----------------------------------------------------------------------------- MLP, block, model


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020); names as in Llama."""

    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GELUMLP(nn.Module):
    """down(gelu(up(x))); GPT-2's MLP with Llama-style names, exact (erf) GELU as nanoGPT's nn.GELU()
    (on CPU faster than GPT-2's tanh approximation)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = build_attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        mlp_cls = SwiGLU if config.mlp == "swiglu" else GELUMLP
        self.mlp = mlp_cls(config.d_model, config.d_ff, config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, start: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), start, cache))  # (B, T, C)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))  # (B, T, C)
class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        residual_std = config.init_std / math.sqrt(2 * config.n_layer)  # GPT-2's scaled init
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and the mean next-token loss if targets given."""
        start = cache.length if cache is not None else 0
        x = self.tok_emb(idx)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, start, cache.layers[i] if cache is not None else None)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if cache is not None:
            cache.length += idx.shape[1]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens; temperature 0 is greedy decoding.

        With the cache each step feeds one token; when the context would exceed block_size
        the cache is rebuilt from the last block_size tokens, exactly as the no-cache path
        crops its input, so both paths produce the same tokens.
        """
        bs = self.config.block_size
        cache = KVCache(self.config.n_layer) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is None or cache.length == 0 or cache.length + 1 > bs:
                if cache is not None:
                    cache = KVCache(self.config.n_layer)
                logits, _ = self(idx[:, -bs:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)  # (B, T+1)
        return idx

    def qk_factors(self) -> list[list[QKFactors]]:
        """The QK probe of every layer: a list (content[, rope]) per block."""
        return [block.attn.qk_factors() for block in self.blocks]

    def logit_terms(self) -> list[list[LogitTerm]]:
        """Per layer, the parts of every head's attention logit with the block's norm gain folded in."""
        return [block.attn.logit_terms(block.attn_norm.weight) for block in self.blocks]

    @torch.no_grad()
    def queries_keys(self, idx: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
        """Layer by layer, every head's queries and keys (B, H, T, d) of idx (B, T) and the softmax scale."""
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            yield block.attn.queries_keys(block.attn_norm(x))
            x = block(x)

    def attention_scores(self, idx: torch.Tensor) -> Iterator[torch.Tensor]:
        """Layer by layer, the causal pre-softmax logits (B, H, T, T) of idx (B, T); -inf above the diagonal."""
        T = idx.shape[1]
        future = ~causal_mask(T, T, idx.device)
        for q, k, scale in self.queries_keys(idx):
            yield ((q @ k.transpose(-1, -2)) * scale).float().masked_fill(future, float("-inf"))  # (B, H, T, T)

    def activation_factors(self, idx: torch.Tensor) -> list[list[QKFactors]]:
        """The QK probe's activation form on idx (B, T): per layer one QKFactors of kind "activation" with
        left_h = Q_h √scale and right_h = K_h √scale, the head's queries and keys over the batch's B·T tokens,
        so left_h right_hᵀ is its logit matrix Q_h K_hᵀ · scale without the causal mask, the batch taken as one
        sequence of B·T tokens. Its squared non-zero singular values are the eigenvalues of
        (Q_hᵀQ_h)(K_hᵀK_h) · scale², with d x d Grams summed over the batch's sequences."""
        layers = []
        for q, k, scale in self.queries_keys(idx):
            B, H, T, d = q.shape
            left = (q * scale**0.5).transpose(0, 1).reshape(H, B * T, d)  # (H, B·T, d)
            right = (k * scale**0.5).transpose(0, 1).reshape(H, B * T, d)  # (H, B·T, d)
            layers.append([QKFactors(left, right, "activation")])  # in the model's dtype, as qk_factors
        return layers

    @torch.no_grad()
    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale every head's logits by eta (L, H) <= 1 through its own query and key weights."""
        for block, layer_eta in zip(self.blocks, eta, strict=True):
            block.attn.clip_qk_(layer_eta.to(block.attn_norm.weight.device))
