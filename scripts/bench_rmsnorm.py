"""Forward+backward time of the model's RMSNorm (written-out backward) against F.rms_norm.

    python -m scripts.bench_rmsnorm [--out results/bench_rmsnorm.json] [--threads 2] [--reps 80]

On the default tiny run's residual stream, (32, 128, 128) fp32 on CPU: models.norm.RMSNorm,
F.rms_norm (autograd through its composite CPU implementation) and, for scale, F.layer_norm
(the fused LayerNorm kernel of GPT-2 and nanoGPT). Implementations are interleaved call by call;
the minimum over `--reps` calls is reported (the least disturbed on a shared machine).
"""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from models.gpt import RMSNorm
from scripts.bench_train import machine_info

SHAPE = (32, 128, 128)  # (B, T, C) of the default run


def bench(reps: int) -> dict[str, float]:
    """Minimum forward+backward milliseconds of each implementation over `reps` interleaved calls."""
    torch.manual_seed(0)
    C = SHAPE[-1]
    norm = RMSNorm(C)
    x = torch.randn(SHAPE, requires_grad=True)
    dy = torch.randn(SHAPE)
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "qkscope RMSNorm": norm,
        "F.rms_norm (autograd)": lambda t: F.rms_norm(t, (C,), norm.weight, norm.eps),
        "F.layer_norm (fused, for scale)": lambda t: F.layer_norm(t, (C,), norm.weight, None, norm.eps),
    }
    times: dict[str, list[float]] = {name: [] for name in impls}
    for i in range(reps + 3):
        for name, fn in impls.items():
            start = time.perf_counter()
            fn(x).backward(dy)
            if i >= 3:
                times[name].append(time.perf_counter() - start)
            x.grad, norm.weight.grad = None, None
    return {name: 1e3 * min(ts) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_rmsnorm.json", help="JSON results path")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--reps", type=int, default=80, help="calls per implementation (the minimum is kept)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = bench(args.reps)
    base = results["qkscope RMSNorm"]
    for name, ms in results.items():
        print(f"{name:32s} {ms:7.3f} ms  ({ms / base:.2f}x qkscope)")
    machine = {**machine_info(args.threads), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "shape": SHAPE, "fwd_bwd_ms": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
