"""Training-step throughput and peak memory: Lightning vs a plain PyTorch loop vs nanoGPT.

    python -m scripts.bench_train [--out results/bench_train.json] [--nanogpt PATH_TO_NANOGPT]
                                  [--sizes tiny small] [--variants mha gqa mla ...] [--steps 10]

Every row is one (size, attention) configuration composed from the real Hydra config
(conf/train.yaml with `model=SIZE attention=VARIANT`), fed by the real KJV DataModule, fp32 on
CPU. Each implementation runs in its own subprocess (so its peak RSS is its own):

  lightning  the LightningModule under a real `lightning.Trainer` with the default callbacks
             (checkpoints, LR monitor, throughput, spectral health) and the CSV logger
  plain      the same model, batches, AdamW groups, LR schedule and gradient clipping in a
             hand-written loop: the framework's overhead is lightning / plain
  nanogpt    nanoGPT's `model.py` (--nanogpt: a clone of github.com/karpathy/nanoGPT) at the
             same d_model, layers, heads, block, batch, vocabulary (bias off, tied embeddings),
             its own AdamW from `configure_optimizers`; compared with `plain` on MHA with a
             GELU MLP of width 4 d_model, its architecture except RMSNorm/RoPE vs LayerNorm/
             learned positions

  interleaved  (with --nanogpt) `plain` and `nanogpt` in one process, a step of each in turn on
             the same batch, `--pair-steps` each: the median per-pair ratio is the comparison
             with nanoGPT (separate processes minutes apart see different machine loads)

Steps after `--warmup` are timed by wall clock (data, forward, backward, clip, optimizer step).
Implementations of one configuration run back to back, `--rounds` times interleaved; the fastest
round of each is reported (the least disturbed on a shared machine) and ratios are taken within
that configuration. Peak memory: the worker's max RSS, and the growth above the RSS before the
first step (weights, optimizer state, activations). Every worker applies the training config's
CPU allocator setting (callbacks.cpu_allocator) and reports minor page faults per timed step.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small")
VARIANTS = ("mha", "gqa", "mla", "mla_prerope", "kv_shift", "mla_kv_shift")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine_info(threads: int) -> dict[str, Any]:
    """The machine a benchmark ran on, as recorded in its JSON."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "threads": threads, "load_avg": os.getloadavg()}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compose(size: str, variant: str, run_dir: Path) -> Any:
    """The training config for a row; variant "mha-gelu" is MHA with nanoGPT's MLP (GELU, 4 d_model)."""
    from hydra import compose, initialize_config_dir

    import trainer.config  # noqa: F401  (schema and resolvers)

    overrides = [f"model={size}", f"attention={variant.removesuffix('-gelu')}", "logger=csv",
                 f"paths.run_dir={run_dir}", f"paths.root={run_dir.parent}",
                 f"paths.cache_dir={ROOT / 'runs' / 'cache'}", "callbacks.progress=null"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=overrides)
    if variant.endswith("-gelu"):
        cfg.model.mlp, cfg.model.d_ff = "gelu", 4 * cfg.model.d_model
    return cfg


def _batches(cfg: Any) -> Any:
    """An iterator over the real DataModule's training batches."""
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return iter(dm.train_dataloader())


def _train_step(model: Any, opt: Any, sched: Any, x: Any, y: Any) -> None:
    """One step as the LightningModule takes it: loss, backward, clip at 1.0, AdamW, schedule."""
    import torch

    model(x, y)[1].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)


def _plain_step_loop(model: Any, opt: Any, sched: Any, batches: Any, steps: int,
                     warmup: int) -> tuple[float, float, int]:
    rss0, start, faults0 = 0.0, 0.0, 0
    for i in range(warmup + steps):
        if i == warmup:
            start, faults0 = time.perf_counter(), _minor_faults()
        if i == 0:
            rss0 = _rss_mb()
        _train_step(model, opt, sched, *next(batches))
    return time.perf_counter() - start, rss0, _minor_faults() - faults0


def worker(impl: str, size: str, variant: str, steps: int, warmup: int, threads: int, nanogpt: str | None) -> dict:
    """One measurement in this process: seconds for `steps` timed steps, tokens/s, memory.

    impl "interleaved" is the qkscope/nanoGPT pair of `_interleaved` instead.
    """
    import torch

    from callbacks.cpu_allocator import retain_freed_heap

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "bench" / "run"
        cfg = _compose(size, variant, run_dir)
        retain_freed_heap(cfg.callbacks.cpu_allocator.top_pad_mb)  # the entry point's CPU setting, for every impl
        if impl == "interleaved":
            return {"impl": impl, "size": size, "variant": variant, **_interleaved(cfg, steps, warmup, nanogpt)}
        if impl == "lightning":
            seconds, rss0, faults = _lightning(cfg, steps, warmup)
        else:
            model, opt, sched = _build_plain(cfg) if impl == "plain" else _build_nanogpt(cfg, nanogpt)
            seconds, rss0, faults = _plain_step_loop(model, opt, sched, _batches(cfg), steps, warmup)
        tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    return {"impl": impl, "size": size, "variant": variant, "steps": steps, "seconds": seconds,
            "tokens_per_s": steps * tokens_per_step / seconds, "minor_faults_per_step": faults // steps,
            "peak_rss_mb": _peak_mb(), "peak_growth_mb": _peak_mb() - rss0}


def _lightning(cfg: Any, steps: int, warmup: int) -> tuple[float, float, int]:
    import lightning as L
    from hydra.utils import instantiate

    marks: dict[str, float] = {}

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == 0:
                marks["rss0"] = _rss_mb()
            if trainer.global_step == warmup:
                marks["start"], marks["faults0"] = time.perf_counter(), _minor_faults()

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            marks["end"], marks["faults"] = time.perf_counter(), _minor_faults()

    cfg.trainer.max_steps = warmup + steps
    cfg.trainer.enable_model_summary = False
    dm = instantiate(cfg.data)
    module = instantiate(cfg.module)
    callbacks = [c for c in instantiate(cfg.callbacks).values() if c is not None] + [StepClock()]
    loggers = list(instantiate(cfg.logger).values())
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return marks["end"] - marks["start"], marks["rss0"], int(marks["faults"] - marks["faults0"])


def _build_plain(cfg: Any) -> tuple[Any, Any, Any]:
    """qkscope's GPT with the LightningModule's AdamW groups and LR schedule."""
    from omegaconf import OmegaConf

    from models import GPT
    from trainer.lit_gpt import OptimConfig, adamw_with_schedule

    model = GPT(OmegaConf.to_object(cfg.model))
    optim = OptimConfig(**OmegaConf.to_container(cfg.optim))
    opt, sched = adamw_with_schedule(model.parameters(), optim, cfg.trainer.max_steps)
    return model, opt, sched


def _build_nanogpt(cfg: Any, path: str | None) -> tuple[Any, Any, None]:
    """nanoGPT's GPT at the same sizes, with its own configure_optimizers (no schedule)."""
    if not path:
        raise SystemExit("--nanogpt PATH is needed for the nanogpt implementation")
    sys.path.insert(0, path)
    import model as nanogpt  # nanoGPT's model.py, from the clone given on the command line

    m, c = cfg.model, cfg.optim
    config = nanogpt.GPTConfig(block_size=cfg.data.block_size, vocab_size=cfg.data.vocab_size, n_layer=m.n_layer,
                               n_head=m.n_head, n_embd=m.d_model, dropout=0.0, bias=False)
    model = nanogpt.GPT(config)
    return model, model.configure_optimizers(c.weight_decay, c.lr, (c.beta1, c.beta2), "cpu"), None


def _interleaved(cfg: Any, steps: int, warmup: int, path: str | None) -> dict:
    """qkscope (plain loop) and nanoGPT in one process, a step of each in turn on the same batch.

    Both see the same machine at nearly the same moment, so the median of the per-pair time
    ratios is far steadier on a shared machine than a ratio of two separate processes' speeds.
    """
    import statistics

    ours, theirs = _build_plain(cfg), _build_nanogpt(cfg, path)
    batches = _batches(cfg)
    times: dict[str, list[float]] = {"qkscope": [], "nanogpt": []}
    for i in range(warmup + steps):
        x, y = next(batches)
        for name, (model, opt, sched) in (("qkscope", ours), ("nanogpt", theirs))[:: 1 if i % 2 else -1]:
            start = time.perf_counter()
            _train_step(model, opt, sched, x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    ratios = [t_n / t_q for t_q, t_n in zip(times["qkscope"], times["nanogpt"], strict=True)]
    return {"steps": steps, "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "ratio_median": statistics.median(ratios), "ratio_quartiles": statistics.quantiles(ratios, n=4)}


def _run_worker(impl: str, size: str, variant: str, args: argparse.Namespace, steps: int | None = None) -> dict:
    steps = steps or args.steps
    cmd = [sys.executable, "-m", "scripts.bench_train", "--worker", impl, size, variant, "--steps", str(steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.nanogpt:
        cmd += ["--nanogpt", args.nanogpt]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {size} {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_train.json", help="JSON results path")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS,
                   help="variants for the lightning/plain rows (none: only the nanoGPT comparison)")
    p.add_argument("--nanogpt", default=None, help="path of a nanoGPT clone (adds the nanoGPT comparison)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest is reported")
    p.add_argument("--pair-steps", type=int, default=40, help="timed steps of each model in the nanoGPT pair")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.threads, args.nanogpt)))
        return

    impls = ("lightning", "plain")
    jobs = [(size, variant, impl) for size in args.sizes for variant in args.variants for impl in impls]
    if args.nanogpt:
        jobs += [(size, "mha-gelu", impl) for size in args.sizes for impl in ("plain", "nanogpt")]
    best: dict[tuple[str, str, str], dict] = {}
    for _ in range(args.rounds):
        for size, variant, impl in jobs:
            r = _run_worker(impl, size, variant, args)
            key = (size, variant, impl)
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
            print(f"{size:5s} {variant:12s} {impl:9s} {r['tokens_per_s']:9.0f} tok/s  peak {r['peak_rss_mb']:6.0f} MB "
                  f"(+{r['peak_growth_mb']:.0f})", flush=True)

    rows = []
    for (size, variant, impl), r in best.items():
        ref = {"lightning": "plain", "plain": "nanogpt"}.get(impl)
        other = best.get((size, variant, ref))
        rows.append({**r, "ratio": r["tokens_per_s"] / other["tokens_per_s"], "ratio_vs": ref} if other else r)
    pairs = [_run_worker("interleaved", size, "mha-gelu", args, args.pair_steps) for size in args.sizes
             if args.nanogpt]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(args.threads), "rows": rows, "interleaved": pairs}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\n{'size':5s} {'variant':12s} {'impl':9s} {'tok/s':>9s} {'peak MB':>8s} ratio")
    for r in rows:
        ratio = f"{r['ratio']:.3f} x {r['ratio_vs']}" if "ratio" in r else ""
        print(f"{r['size']:5s} {r['variant']:12s} {r['impl']:9s} {r['tokens_per_s']:9.0f} "
              f"{r['peak_rss_mb']:8.0f} {ratio}")
    for r in pairs:
        ms, (q1, _, q3) = r["median_step_ms"], r["ratio_quartiles"]
        print(f"{r['size']:5s} interleaved, {r['steps']} steps each: qkscope {ms['qkscope']:.0f} ms, nanoGPT "
              f"{ms['nanogpt']:.0f} ms a step; qkscope tokens/s = {r['ratio_median']:.3f} x nanoGPT "
              f"(quartiles {q1:.3f}-{q3:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
