"""Training-step throughput and peak memory: Lightning vs a plain PyTorch loop vs nanoGPT, eager and compiled.

    python -m scripts.bench_train [--out results/bench_train.json] [--nanogpt PATH_TO_NANOGPT]
                                  [--sizes tiny small] [--variants mha gqa mla ...] [--steps 10]

Every row is one (size, attention) configuration composed from the real Hydra config
(conf/train.yaml with `model=SIZE attention=VARIANT`), fed by the real KJV DataModule, fp32 on
CPU. Each implementation runs in its own subprocess (so its peak RSS is its own):

  lightning   the LightningModule under a real `lightning.Trainer` with the default callbacks
              (checkpoints, LR monitor, throughput, spectral health) and the CSV logger
  lightning+compile  the same with module.compile=true (torch.compile of the loss, fullgraph)
  plain       the same model, batches, AdamW groups, LR schedule and gradient clipping in a
              hand-written loop: the framework's overhead is lightning / plain

  interleaved (with --nanogpt) qkscope's `plain` loop and nanoGPT's `model.py` (a clone of
              github.com/karpathy/nanoGPT; same d_model, layers, heads, block, batch, vocabulary,
              bias off, tied embeddings, its own AdamW from `configure_optimizers`, which is
              fused only on CUDA) in one process, and nanoGPT again with the fused AdamW qkscope
              uses on CPU: a step of each in turn on the same batch, `--pair-steps` each, all
              eager and then all compiled (nanoGPT as its train.py does, `torch.compile(model)`).
              qkscope runs MHA with nanoGPT's MLP (GELU, 4 d_model): what differs is RMSNorm/RoPE
              against LayerNorm/learned positions. The median per-pair ratio is the comparison
              (separate processes minutes apart see different machine loads).

Steps after `--warmup` are timed by wall clock (data, forward, backward, clip, optimizer step); the
first step is timed on its own (with compile: tracing and compiling the forward and backward).
Every compiling worker starts from an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a fresh
temporary directory), so its first step is what a first run pays. From eager and compiled step
times and first steps, `payoff_steps` is the run length from which compiling is faster overall.
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

import lightning as L

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


def compose_config(size: str, variant: str, run_dir: Path, extra: tuple[str, ...] = ()) -> Any:
    """The training config for a row; variant "mha-gelu" is MHA with nanoGPT's MLP (GELU, 4 d_model)."""
    from hydra import compose, initialize_config_dir

    import trainer.config  # noqa: F401  (schema and resolvers)

    overrides = [f"model={size}", f"attention={variant.removesuffix('-gelu')}", "logger=csv",
                 f"paths.run_dir={run_dir}", f"paths.root={run_dir.parent}",
                 f"paths.cache_dir={ROOT / 'runs' / 'cache'}", "callbacks.progress=null", *extra]
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


def _train_step(model: Any, opt: Any, sched: Any, x: Any, y: Any, loss_of: Any) -> None:
    """One step as the LightningModule takes it: loss_of(model, x, y), backward, clip at 1.0, AdamW, schedule."""
    import torch

    loss_of(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    opt.zero_grad(set_to_none=True)


def _loss_of(compiled: bool) -> Any:
    """qkscope's loss of a batch as the LightningModule computes it, compiled as module.compile compiles it."""
    import torch

    from trainer.lit_gpt import next_token_loss

    return torch.compile(next_token_loss, fullgraph=True) if compiled else next_token_loss


def _nanogpt_loss(model: Any, x: Any, y: Any) -> Any:
    return model(x, y)[1]


def _plain_step_loop(model: Any, opt: Any, sched: Any, batches: Any, steps: int, warmup: int,
                     loss_of: Any) -> tuple[float, float, int, float]:
    rss0, start, faults0, first = 0.0, 0.0, 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            start, faults0 = time.perf_counter(), _minor_faults()
        if i == 0:
            rss0, first = _rss_mb(), time.perf_counter()
        _train_step(model, opt, sched, *next(batches), loss_of)
        if i == 0:
            first = time.perf_counter() - first
    return time.perf_counter() - start, rss0, _minor_faults() - faults0, first


def worker(impl: str, size: str, variant: str, steps: int, warmup: int, threads: int, nanogpt: str | None,
           compiled: bool = False) -> dict:
    """One measurement in this process: seconds for `steps` timed steps, tokens/s, memory, the first step.

    impl "interleaved" is the qkscope/nanoGPT pair of `_interleaved` instead.
    """
    import torch

    from callbacks.cpu_allocator import retain_freed_heap

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "bench" / "run"
        cfg = compose_config(size, variant, run_dir)
        retain_freed_heap(cfg.callbacks.cpu_allocator.top_pad_mb)  # the entry point's CPU setting, for every impl
        if impl == "interleaved":
            return {"impl": impl, "size": size, "variant": variant, "compiled": compiled,
                    **_interleaved(cfg, steps, warmup, nanogpt, compiled)}
        if impl == "lightning":
            seconds, rss0, faults, first = _lightning(cfg, steps, warmup, compiled)
        else:
            seconds, rss0, faults, first = _plain_step_loop(*_build_plain(cfg), _batches(cfg), steps, warmup,
                                                            _loss_of(compiled))
        tokens_per_step = cfg.data.batch_size * cfg.data.block_size
    return {"impl": impl, "size": size, "variant": variant, "compiled": compiled, "steps": steps,
            "seconds": seconds, "step_ms": 1e3 * seconds / steps, "first_step_s": first,
            "tokens_per_s": steps * tokens_per_step / seconds, "minor_faults_per_step": faults // steps,
            "peak_rss_mb": _peak_mb(), "peak_growth_mb": _peak_mb() - rss0}


class StepClock(L.Callback):
    """Times a fit: the first step alone, then the steps from `warmup` on (wall clock), with RSS and minor
    faults at those marks. Read `marks` after the fit."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.marks: dict[str, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == 0:
            self.marks["rss0"], self.marks["first"] = _rss_mb(), time.perf_counter()
        if trainer.global_step == self.warmup:
            self.marks["start"], self.marks["faults0"] = time.perf_counter(), _minor_faults()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.marks["end"], self.marks["faults"] = time.perf_counter(), _minor_faults()
        if trainer.global_step == 1:
            self.marks["first"] = self.marks["end"] - self.marks["first"]


def timed_fit(cfg: Any, steps: int, warmup: int, **trainer_kwargs: Any) -> tuple[dict[str, float], list]:
    """Fit the composed config for warmup + steps steps without validation; the StepClock's marks and the
    callbacks (the spectral one holds its seconds per check)."""
    from hydra.utils import instantiate

    cfg.trainer.max_steps = warmup + steps
    cfg.trainer.enable_model_summary = False
    dm = instantiate(cfg.data)
    module = instantiate(cfg.module)
    clock = StepClock(warmup)
    callbacks = [c for c in instantiate(cfg.callbacks).values() if c is not None]
    loggers = list(instantiate(cfg.logger).values())
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks, clock], logger=loggers, limit_val_batches=0,
                          **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    return clock.marks, callbacks


def _lightning(cfg: Any, steps: int, warmup: int, compiled: bool) -> tuple[float, float, int, float]:
    cfg.module.compile = compiled
    marks, _ = timed_fit(cfg, steps, warmup)
    return marks["end"] - marks["start"], marks["rss0"], int(marks["faults"] - marks["faults0"]), marks["first"]


def _build_plain(cfg: Any) -> tuple[Any, Any, Any]:
    """qkscope's GPT with the LightningModule's AdamW groups and LR schedule."""
    from omegaconf import OmegaConf

    from models import GPT
    from trainer.lit_gpt import OptimConfig, adamw_with_schedule

    model = GPT(OmegaConf.to_object(cfg.model))
    optim = OptimConfig(**OmegaConf.to_container(cfg.optim))
    opt, sched = adamw_with_schedule(model.parameters(), optim, cfg.trainer.max_steps)
    return model, opt, sched


def _build_nanogpt(cfg: Any, path: str | None, compiled: bool, fused: bool = False) -> tuple[Any, Any, None]:
    """nanoGPT's GPT at the same sizes, with its own configure_optimizers (no schedule); compiled as nanoGPT's
    train.py compiles it (`torch.compile(model)`). nanoGPT fuses AdamW only on CUDA; `fused` gives it the
    fused kernel on CPU too, as qkscope has it."""
    import torch

    if not path:
        raise SystemExit("--nanogpt PATH is needed for the nanoGPT comparison")
    sys.path.insert(0, path)
    import model as nanogpt  # nanoGPT's model.py, from the clone given on the command line

    m, c = cfg.model, cfg.optim
    config = nanogpt.GPTConfig(block_size=cfg.data.block_size, vocab_size=cfg.data.vocab_size, n_layer=m.n_layer,
                               n_head=m.n_head, n_embd=m.d_model, dropout=0.0, bias=False)
    torch.manual_seed(0)
    model = nanogpt.GPT(config)
    opt = model.configure_optimizers(c.weight_decay, c.lr, (c.beta1, c.beta2), "cpu")
    if fused:
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), fused=True)
    return (torch.compile(model) if compiled else model), opt, None


def _interleaved(cfg: Any, steps: int, warmup: int, path: str | None, compiled: bool) -> dict:
    """qkscope (plain loop), nanoGPT as shipped and nanoGPT with fused AdamW in one process, a step of
    each in turn on the same batch (the order rotating every step).

    All three see the same machine at nearly the same moment, so the median of the per-step time
    ratios is far steadier on a shared machine than a ratio of separate processes' speeds. Against
    nanoGPT as shipped the ratio is the whole step; against nanoGPT with the fused optimizer it is
    what the models (RMSNorm/RoPE against LayerNorm/learned positions) leave.
    """
    import statistics

    impls = {"qkscope": (*_build_plain(cfg), _loss_of(compiled)),
             "nanogpt": (*_build_nanogpt(cfg, path, compiled), _nanogpt_loss),
             "nanogpt_fused_adamw": (*_build_nanogpt(cfg, path, compiled, fused=True), _nanogpt_loss)}
    names = list(impls)
    batches = _batches(cfg)
    times: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, float] = {}
    for i in range(warmup + steps):
        x, y = next(batches)
        for name in names[i % 3:] + names[:i % 3]:
            start = time.perf_counter()
            _train_step(*impls[name][:3], x, y, impls[name][3])
            if i == 0:
                first[name] = time.perf_counter() - start
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    ratios = {name: [t_n / t_q for t_q, t_n in zip(times["qkscope"], times[name], strict=True)] for name in names[1:]}
    return {"steps": steps, "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "first_step_s": first, "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
            "ratio_quartiles": {k: statistics.quantiles(v, n=4) for k, v in ratios.items()}}


def payoff_steps(eager: dict, compiled: dict) -> float | None:
    """Run length N from which compiling is faster in all: first_c + (N-1) step_c <= first_e + (N-1) step_e.
    None when the compiled step is not faster."""
    step_e, step_c = eager["seconds"] / eager["steps"], compiled["seconds"] / compiled["steps"]
    if step_c >= step_e:
        return None
    return 1 + max(0.0, compiled["first_step_s"] - eager["first_step_s"]) / (step_e - step_c)


def _run_worker(impl: str, size: str, variant: str, compiled: bool, args: argparse.Namespace,
                steps: int | None = None) -> dict:
    steps = steps or args.steps
    cmd = [sys.executable, "-m", "scripts.bench_train", "--worker", impl, size, variant, "--steps", str(steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), *(["--compile"] if compiled else [])]
    if args.nanogpt:
        cmd += ["--nanogpt", args.nanogpt]
    with tempfile.TemporaryDirectory() as inductor_cache:  # a cold compile, as a first run has it
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": str(args.threads),
               "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {size} {variant} compiled={compiled} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


IMPLS = (("lightning", False), ("plain", False), ("lightning", True))  # (impl, compiled) per variant row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_train.json", help="JSON results path")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS,
                   help="variants for the lightning/plain rows (none: only the nanoGPT comparison)")
    p.add_argument("--nanogpt", default=None, help="path of a nanoGPT clone (adds the nanoGPT comparison)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest is reported")
    p.add_argument("--pair-steps", type=int, default=40, help="timed steps of each model in the nanoGPT pair")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup, args.threads, args.nanogpt, args.compile)))
        return

    jobs = [(size, variant, impl, compiled) for size in args.sizes for variant in args.variants
            for impl, compiled in IMPLS]
    best: dict[tuple[str, str, str, bool], dict] = {}
    for _ in range(args.rounds):
        for size, variant, impl, compiled in jobs:
            r = _run_worker(impl, size, variant, compiled, args)
            key = (size, variant, impl, compiled)
            if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = r
            print(f"{size:5s} {variant:12s} {impl + '+compile' * compiled:17s} {r['tokens_per_s']:7.0f} tok/s  "
                  f"first step {r['first_step_s']:5.1f} s  peak {r['peak_rss_mb']:5.0f} MB", flush=True)
    rows = []
    for size, variant in dict.fromkeys((size, variant) for size, variant, _, _ in jobs):
        lightning, plain, compiled = (best[(size, variant, impl, c)] for impl, c in IMPLS)
        rows.append({"size": size, "variant": variant, "lightning": lightning, "plain": plain,
                     "lightning_compiled": compiled,
                     "lightning_over_plain": lightning["tokens_per_s"] / plain["tokens_per_s"],
                     "compiled_over_eager": compiled["tokens_per_s"] / lightning["tokens_per_s"],
                     "payoff_steps": payoff_steps(lightning, compiled)})
    pairs = [_run_worker("interleaved", size, "mha-gelu", compiled, args, args.pair_steps)
             for size in args.sizes for compiled in (False, True) if args.nanogpt]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(args.threads), "rows": rows, "interleaved": pairs}
    Path(args.out).write_text(json.dumps(report, indent=1))

    print("\n| size | variant | lightning tok/s | plain tok/s | lightning / plain | compiled tok/s | compiled / eager "
          "| first step eager / compiled s | compile pays off after | peak RSS MB eager / compiled |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, c = r["lightning"], r["lightning_compiled"]
        payoff = f"{r['payoff_steps']:.0f} steps" if r["payoff_steps"] is not None else "never"
        print(f"| {r['size']} | {r['variant']} | {e['tokens_per_s']:.0f} | {r['plain']['tokens_per_s']:.0f} | "
              f"{r['lightning_over_plain']:.2f} | {c['tokens_per_s']:.0f} | {r['compiled_over_eager']:.2f} | "
              f"{e['first_step_s']:.1f} / {c['first_step_s']:.1f} | {payoff} | "
              f"{e['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} |")
    if pairs:
        print("\n| size | mode | qkscope ms / step | nanoGPT ms / step (as shipped / fused AdamW) | "
              "qkscope tokens/s vs nanoGPT as shipped (median, quartiles) "
              "| vs nanoGPT with fused AdamW | first step qkscope / nanoGPT s |")
        print("|---|---|---|---|---|---|---|")
    for r in pairs:
        ms, first, med, quart = r["median_step_ms"], r["first_step_s"], r["ratio_median"], r["ratio_quartiles"]
        cells = [f"{med[k]:.3f}x ({quart[k][0]:.3f}-{quart[k][2]:.3f})" for k in ("nanogpt", "nanogpt_fused_adamw")]
        print(f"| {r['size']} | {'compiled' if r['compiled'] else 'eager'} | {ms['qkscope']:.0f} | "
              f"{ms['nanogpt']:.0f} / {ms['nanogpt_fused_adamw']:.0f} | {cells[0]} | {cells[1]} | "
              f"{first['qkscope']:.1f} / {first['nanogpt']:.1f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
