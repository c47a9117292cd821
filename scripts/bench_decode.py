"""Decode throughput and KV-cache memory at a long context, attention variants side by side.

    python -m scripts.bench_decode [--out results/bench_decode.json] [--context 2000] [--new-tokens 16]

One model per variant (block_size 2048, d_model 256, 8 heads, 4 layers, fp32, random weights),
prefilled with `context` tokens; then `new-tokens` greedy steps of one token each are timed.
Decode paths:
  cache         the variant's cache (MHA/GQA/KV-shift: k, v; MLA: c_KV + k_R, absorbed weights)
  latent+up     MLA caching c_KV + k_R but up-projecting every cached latent to per-head k, v each
                step (the non-absorbed use of the same cache)
  no cache      recompute the whole window every step (what generate(use_cache=False) does)
  compiled      the cache path through torch.compile(model.forward, dynamic=True, fullgraph=True): one
                graph whose cache length is symbolic (the second step recompiles it so; both are
                untimed warm-up, and their seconds are reported as compile_s)
Rounds interleave the variants (each round decodes from the same prefilled cache) and the
fastest round of each is reported (the median too, in the JSON): on a shared machine the
fastest round is the least disturbed one, and interleaving puts all variants under one load.
"""

import argparse
import json
import statistics
import time
from typing import Any

import torch

from models import GPT, GPTConfig
from models.gpt import KVCache, LayerCache

VARIANTS = {  # row name -> (attention config, decode path)
    "mha": ({"name": "mha"}, "cache"),
    "gqa (2 kv heads)": ({"name": "gqa", "n_kv_head": 2}, "cache"),
    "kv_shift": ({"name": "kv_shift"}, "cache"),
    "mla absorbed": ({"name": "mla"}, "cache"),
    "mla latent+up": ({"name": "mla"}, "latent+up"),
    "mla no cache": ({"name": "mla"}, "no cache"),
    "mla_prerope": ({"name": "mla_prerope"}, "cache"),
    "mla_kv_shift absorbed": ({"name": "mla_kv_shift"}, "cache"),
    "mha compiled": ({"name": "mha"}, "compiled"),
    "mla absorbed compiled": ({"name": "mla"}, "compiled"),
}
COMPILE_WARMUP = 2  # decode steps before timing a compiled path: the static graph, then the dynamic one


def snapshot(cache: KVCache) -> KVCache:
    """A cache to decode from without touching `cache` (its tensors are replaced, never written)."""
    copy = KVCache(len(cache.layers))
    copy.length = cache.length
    for src, dst in zip(cache.layers, copy.layers, strict=True):
        dst.tensors = dict(src.tensors)
    return copy


@torch.no_grad()
def decode(model: GPT, idx: torch.Tensor, cache: KVCache | None, steps: int, forward: Any = None) -> float:
    """Seconds per greedy step of one token (with the cache, or recomputing the window); `forward` replaces
    the model's call (a compiled forward)."""
    forward = forward or model
    t0 = time.perf_counter()
    for _ in range(steps):
        if cache is None:
            logits = forward(idx[:, -model.config.block_size :])[0]
        else:
            logits = forward(idx[:, -1:], cache=cache)[0]
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return (time.perf_counter() - t0) / steps


def layer_bytes_per_token(cache: KVCache) -> float:
    layer: LayerCache = cache.layers[0]
    return layer.nbytes() / cache.length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench_decode.json", help="JSON results path")
    p.add_argument("--context", type=int, default=2000, help="prefill length")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per round")
    p.add_argument("--no-cache-steps", type=int, default=1, help="steps timed per round for the recompute path")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds; the fastest is reported")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--n-layer", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(vocab_size=2048, block_size=2048, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head)
    assert args.context + args.new_tokens <= shape["block_size"], "context + new tokens must fit block_size"

    rows = []
    for B in args.batch:
        idx = torch.randint(0, shape["vocab_size"], (B, args.context), generator=torch.Generator().manual_seed(0))
        runs = {}
        for name, (attention, path) in VARIANTS.items():
            if path == "no cache" and B > 1:
                continue
            torch.manual_seed(0)
            model = GPT(GPTConfig(**shape, attention=attention)).eval()
            for block in model.blocks:
                block.attn.absorb = path != "latent+up"  # only MLA reads it
            cache = KVCache(model.config.n_layer)
            t0 = time.perf_counter()
            with torch.no_grad():
                model(idx, cache=cache)
            prefill_s, forward, compile_s = time.perf_counter() - t0, None, 0.0
            if path == "compiled":
                forward = torch.compile(model.forward, dynamic=True, fullgraph=True)
                compile_s = COMPILE_WARMUP * decode(model, idx, snapshot(cache), COMPILE_WARMUP, forward)
            runs[name] = (model, path, cache, prefill_s, [], forward, compile_s)
        for _ in range(args.rounds):
            for model, path, cache, _, times, forward, _ in runs.values():
                steps = args.no_cache_steps if path == "no cache" else args.new_tokens
                dt = decode(model, idx, None if path == "no cache" else snapshot(cache), steps, forward)
                times.append(dt)
        mha_step = min(runs["mha"][4])
        for name, (_, path, cache, prefill_s, times, _, compile_s) in runs.items():
            step = min(times)
            per_token = layer_bytes_per_token(cache) / B if path != "no cache" else 0.0
            rows.append({
                "variant": name, "path": path, "batch": B, "context": args.context,
                "tokens_per_s": B / step, "step_ms": 1e3 * step, "speed_vs_mha": mha_step / step,
                "tokens_per_s_median": B / statistics.median(times), "step_ms_rounds": [1e3 * t for t in times],
                "prefill_s": prefill_s, "compile_s": compile_s,
                "cache_mib": cache.nbytes() / 2**20 if path != "no cache" else 0.0,
                "cache_bytes_per_token_per_layer": per_token,
                "cache_vs_mha": per_token / (layer_bytes_per_token(runs["mha"][2]) / B),
            })
    print(f"decode at {args.context} tokens of context: d_model {args.d_model}, {args.n_head} heads, "
          f"{args.n_layer} layers, fp32, {args.threads} threads; fastest of {args.rounds} rounds\n")
    print("| variant | decode path | batch | tokens/s | speed vs MHA | cache MiB | bytes/token/layer | cache vs MHA |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['path']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['speed_vs_mha']:.2f} | "
              f"{r['cache_mib']:.2f} | {r['cache_bytes_per_token_per_layer']:.0f} | {r['cache_vs_mha']:.3f} |")
    meta = {"threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens, **shape,
            "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"config": meta, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
