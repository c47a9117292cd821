"""A GPT-style decoder whose attention is a configuration choice.

Pre-norm blocks (RMSNorm), rotary positions inside the attention, SwiGLU or GELU MLP,
optionally tied input/output embeddings; `generate()` decodes with a per-layer cache.
"""

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import build_attention
from models.attention.common import causal_mask
from models.cache import KVCache, LayerCache
from models.config import GPTConfig
from models.mlp import GELUMLP, SwiGLU
from models.norm import RMSNorm
from models.probe import LogitTerm, QKFactors


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
    def attention_scores(self, idx: torch.Tensor) -> Iterator[torch.Tensor]:
        """Layer by layer, the causal pre-softmax logits (B, H, T, T) of idx (B, T); -inf above the diagonal."""
        T = idx.shape[1]
        future = ~causal_mask(T, T, idx.device)
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            yield block.attn.attention_scores(block.attn_norm(x)).float().masked_fill(future, float("-inf"))
            x = block(x)

    @torch.no_grad()
    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale every head's logits by eta (L, H) <= 1 through its own query and key weights."""
        for block, layer_eta in zip(self.blocks, eta, strict=True):
            block.attn.clip_qk_(layer_eta.to(block.attn_norm.weight.device))
