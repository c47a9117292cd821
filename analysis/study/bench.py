"""Timing of one spectral check (`SpectralAnalyzer.analyze`) on the shipped model shapes.

The logic behind scripts/bench_spectral.py: build a model per preset, time the first call (which
simulates and caches the null calibration) and the median of repeated cached calls, with and
without the per-layer d×d sum, and optionally WeightWatcher's `analyze(mp_fit=True)` on the same
query/key weights when the `weightwatcher` package happens to be installed (never a dependency).
"""

import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from analysis.spectral.health import SpectralAnalyzer
from models import GPT, GPTConfig

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 4, "d_model": 128, "n_head": 4},
    "small": {"n_layer": 6, "d_model": 256, "n_head": 8},
    "gpt2-small": {"n_layer": 12, "d_model": 768, "n_head": 12},
}


@dataclass
class BenchRow:
    """Seconds per check for one preset (medians over `repeats` cached calls)."""

    preset: str
    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    null: str
    first_call_s: float  # includes simulating the calibration (empty cache)
    calibration_s: float  # the part of first_call_s spent simulating the null
    check_s: float  # cached: heads + factors + layer sum
    check_heads_only_s: float  # cached, layer_sum=False
    check_cpu_s: float  # process CPU seconds of check_s
    check_heads_only_cpu_s: float
    weightwatcher_s: float | None = None  # ww.WeightWatcher(model=...).analyze(mp_fit=True), if installed


def build_model(preset: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=2048, block_size=128, **PRESETS[preset]))


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of fn(). On a shared CPU the wall time
    includes waiting for cores; with one LAPACK thread the CPU time is the work itself."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def bench_preset(preset: str, null: str = "product", repeats: int = 5, weightwatcher: bool = False) -> BenchRow:
    """Time one preset with a fresh (empty) calibration cache, then cached."""
    model = build_model(preset)
    layers = model.qk_factors()
    from analysis.spectral import calibration

    calibration._MEMORY.clear()
    with tempfile.TemporaryDirectory() as tmp:
        an = SpectralAnalyzer(null=null, cache_dir=tmp)
        t0 = time.perf_counter()
        first = an.analyze(layers)
        first_s = time.perf_counter() - t0
        an.analyze(layers)  # warm
        check, check_cpu = _median_seconds(lambda: an.analyze(model.qk_factors()), repeats)
        heads, heads_cpu = _median_seconds(lambda: an.analyze(model.qk_factors(), layer_sum=False), repeats)
    cfg = PRESETS[preset]
    return BenchRow(
        preset=preset,
        n_layer=cfg["n_layer"],
        d_model=cfg["d_model"],
        n_head=cfg["n_head"],
        d_head=cfg["d_model"] // cfg["n_head"],
        null=null,
        first_call_s=first_s,
        calibration_s=first.calibration_seconds,
        check_s=check,
        check_heads_only_s=heads,
        check_cpu_s=check_cpu,
        check_heads_only_cpu_s=heads_cpu,
        weightwatcher_s=time_weightwatcher(model) if weightwatcher else None,
    )


def time_weightwatcher(model: torch.nn.Module) -> float | None:
    """Seconds of `ww.WeightWatcher(model=model).analyze(mp_fit=True)` restricted to the attention
    q/k projections, or None when weightwatcher is not importable or fails."""
    try:
        import weightwatcher as ww
    except Exception:
        return None
    qk = torch.nn.ModuleDict(
        {
            name.replace(".", "_"): mod
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.endswith(("q_proj", "k_proj"))
        }
    )
    try:
        t0 = time.perf_counter()
        ww.WeightWatcher(model=qk).analyze(mp_fit=True)
        return time.perf_counter() - t0
    except Exception:
        return None


def environment() -> dict[str, object]:
    """Machine facts worth printing next to timings (the CPU is often shared)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_5m_15m": [round(x, 2) for x in load],
    }


def run(
    presets: list[str], null: str = "product", repeats: int = 5, weightwatcher: bool = False
) -> dict[str, object]:
    """Bench every preset; a JSON-ready dict with the rows and the environment."""
    rows = [bench_preset(p, null, repeats, weightwatcher and p == "gpt2-small") for p in presets]
    return {"environment": environment(), "rows": [asdict(r) for r in rows]}


def format_table(result: dict[str, object]) -> str:
    head = (
        f"{'preset':<11} {'L':>3} {'d':>4} {'H':>3} {'dh':>3}  {'first call':>10} {'(calib)':>8} "
        f"{'check':>8} {'heads only':>10} {'check CPU':>9} {'WW mp_fit':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:  # type: ignore[union-attr]
        ww = "-" if r["weightwatcher_s"] is None else f"{r['weightwatcher_s']:.2f}s"
        lines.append(
            f"{r['preset']:<11} {r['n_layer']:>3} {r['d_model']:>4} {r['n_head']:>3} {r['d_head']:>3}  "
            f"{r['first_call_s']:>9.3f}s {r['calibration_s']:>7.3f}s {r['check_s']:>7.3f}s "
            f"{r['check_heads_only_s']:>9.3f}s {r['check_cpu_s']:>8.3f}s {ww:>9}"
        )
    lines.append(f"environment: {result['environment']}")
    return "\n".join(lines)
