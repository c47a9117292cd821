"""GPU throughput and MFU at model=medium: bf16-mixed, torch.compile, MHA and MLA, the spectral check on.

    python -m scripts.bench_gpu [--out results/bench_gpu.json] [--steps 50] [--batch 16] [--block 1024]
    python -m scripts.bench_gpu --dry-run      # the same code path on CPU at model=tiny: plumbing only

Meant for one H100/H200 and under 8 minutes. For each attention variant (default: mha, mla):
  backend   which fused attention kernel the training forward really calls: the profiler's op names of
            one bf16-autocast forward and backward (flash, memory-efficient, cuDNN or math). MLA's
            queries and keys are d_nope + d_rope wide and its values d_v; the model pads the values
            to the query width so the fused kernels apply (models/mla.py), and this row shows
            whether they do
  train     a real Lightning Trainer (trainer=gpu: bf16-mixed; module.compile=true; the default
            callbacks, the spectral check every --spectral-every steps) on the KJV at batch x block
            tokens: tokens/s over the steps after --warmup (the compiling steps are excluded and
            reported as first_step_s), MFU = analytic training FLOPs per batch
            (analysis/study/flops.py) x batches/s / the device's dense bf16 peak (PEAK_BF16 below)
  spectral  the spectral check's seconds per check on the GPU (the callback's own clock)
  ddp       with more than one visible GPU, the same run under trainer=ddp on all of them: tokens/s
            and scaling over one GPU. With one GPU this is reported as not measured.

The device machine needs the project's dependencies (hydra-core, omegaconf, datasets, wandb,
tokenizers) next to its CUDA torch; W&B is off (CSV logger). The output JSON holds the machine, the
commit, every figure and the command line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from models import GPT
from scripts.bench_train import ROOT, compose_config, timed_fit

# Dense bf16 tensor-core peaks, FLOP/s. NVIDIA's datasheets list bf16 "with sparsity"; dense is half.
PEAK_BF16 = (  # (substring of torch.cuda.get_device_name, FLOP/s, source)
    ("H200 NVL", 835.5e12, "NVIDIA H200 Tensor Core GPU datasheet: H200 NVL BF16 1,671 TFLOPS with sparsity"),
    ("H200", 989.5e12, "NVIDIA H200 Tensor Core GPU datasheet: H200 SXM BF16 1,979 TFLOPS with sparsity"),
    ("H100 PCIe", 756.0e12, "NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe BF16 1,513 TFLOPS with sparsity"),
    ("H100 80GB HBM3", 989.5e12, "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity"),
)
SDPA_KERNELS = {  # aten op name -> backend
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
}


def peak_bf16(device_name: str) -> tuple[float | None, str | None]:
    """The device's dense bf16 peak FLOP/s and its source, or (None, None) for a device not in PEAK_BF16."""
    for key, flops, source in PEAK_BF16:
        if key in device_name:
            return flops, source
    return None, None


def attention_backend(model: torch.nn.Module, x: torch.Tensor, device: str) -> list[str]:
    """The fused-attention backends one autocast forward + backward of `model` on x really calls."""
    from torch.profiler import profile

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with profile() as prof, torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        model(x, x)[1].backward()
    names = {e.key.removeprefix("aten::") for e in prof.key_averages()}
    found = sorted({backend for op, backend in SDPA_KERNELS.items() if op in names})
    return found or (["math"] if "_scaled_dot_product_attention_math" in names else ["none found"])


def train_row(variant: str, args: argparse.Namespace, peak: float | None, trainer: str,
              extra: tuple[str, ...] = ()) -> dict:
    """One timed fit through the real config: tokens/s, MFU, the first (compiling) step, the spectral check."""
    from analysis.study.flops import train_flops_per_batch
    from callbacks.spectral import SpectralHealthCallback

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(args.size, variant, Path(tmp) / "bench" / "run", (
            f"trainer={trainer}", "module.compile=true", f"data.batch_size={args.batch}",
            f"data.block_size={args.block}", f"spectral.every_n_steps={args.spectral_every}",
            "module.sample_tokens=0", *extra))
        marks, callbacks = timed_fit(cfg, args.steps, args.warmup)
    spectral = next(c for c in callbacks if isinstance(c, SpectralHealthCallback))
    seconds, devices = marks["end"] - marks["start"], int(cfg.trainer.devices)
    batches_per_s = args.steps / seconds
    flops = train_flops_per_batch(OmegaConf.to_object(cfg.model), args.batch, args.block) * devices
    return {"variant": variant, "trainer": trainer, "devices": devices, "steps": args.steps,
            "tokens_per_s": batches_per_s * args.batch * args.block * devices,
            "step_ms": 1e3 * seconds / args.steps, "first_step_s": marks["first"],
            "model_tflops_per_s": batches_per_s * flops / 1e12,
            "mfu": batches_per_s * flops / (peak * devices) if peak else None,
            "spectral_checks": spectral.checks,
            "spectral_s_per_check": spectral.seconds_total / max(1, spectral.checks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_gpu.json", help="JSON results path")
    p.add_argument("--variants", nargs="+", default=["mha", "mla"])
    p.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first compiles)")
    p.add_argument("--batch", type=int, default=16, help="sequences per device per step")
    p.add_argument("--block", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--spectral-every", type=int, default=25, help="spectral check interval in steps")
    p.add_argument("--dry-run", action="store_true", help="CPU, model=tiny, a few steps: checks the code path")
    p.add_argument("--ddp-devices", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size, args.trainer = ("tiny", "cpu") if args.dry_run else ("medium", "gpu")
    if args.dry_run:
        args.steps, args.warmup, args.batch, args.block, args.spectral_every = 3, 1, 4, 128, 2
    if args.ddp_devices:
        on = ("trainer.accelerator=cpu", "trainer.precision=32-true") if args.dry_run else (
            "trainer.accelerator=gpu", "trainer.precision=bf16-mixed")
        peak = None if args.dry_run else peak_bf16(torch.cuda.get_device_name(0))[0]
        for variant in args.variants:
            row = train_row(variant, args, peak, "ddp", (*on, f"trainer.devices={args.ddp_devices}"))
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                print(json.dumps(row), flush=True)
        return
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; --dry-run checks the script on CPU")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    peak, source = peak_bf16(name)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    ddp_devices = 2 if args.dry_run else gpus  # a dry run checks the DDP path on two CPU processes
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report: dict[str, Any] = {"device": name, "gpus": gpus, "peak_bf16_flops": peak, "peak_source": source,
                              "torch": torch.__version__, "commit": commit.strip(), "command": sys.argv,
                              "batch": args.batch, "block": args.block, "size": args.size, "rows": []}
    start = time.perf_counter()
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config(args.size, variant, Path(tmp) / "probe" / "run", (f"data.block_size={args.block}",))
        model = GPT(OmegaConf.to_object(cfg.model)).to(device)
        x = torch.randint(0, cfg.model.vocab_size, (2, args.block), device=device)
        backend = attention_backend(model, x, device)
        del model
        row = {**train_row(variant, args, peak, args.trainer), "attention_backend": backend}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    if ddp_devices > 1:  # Lightning's DDP launcher re-runs the command line per rank: a child that runs only DDP
        cmd = [sys.executable, "-m", "scripts.bench_gpu", *sys.argv[1:], "--ddp-devices", str(ddp_devices)]
        child = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if child.returncode != 0:
            report["ddp"] = f"failed (exit {child.returncode}): {child.stderr.strip()[-500:]}"
        for line in child.stdout.splitlines() if child.returncode == 0 else []:
            if line.startswith("{"):
                row = json.loads(line)
                single = next(r for r in report["rows"] if r["variant"] == row["variant"])
                report["rows"].append({**row, "scaling": row["tokens_per_s"] / (single["tokens_per_s"] * ddp_devices)})
    else:
        report["ddp"] = f"not measured: {gpus} GPU visible"
    report["wall_s"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{name}: peak bf16 {peak / 1e12:.1f} TFLOP/s ({source})" if peak else f"\n{name}: peak unknown, no MFU")
    print("| variant | devices | attention kernel | tokens/s | MFU | first step s | spectral s / check |")
    print("|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['variant']} | {r['devices']} | {', '.join(r.get('attention_backend', ['-']))} | "
              f"{r['tokens_per_s']:.0f} | {mfu} | {r['first_step_s']:.1f} | {r['spectral_s_per_check']:.3f} |")
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
