"""The alerts benchmark: labelled healthy and failing runs, every alert rule and three baselines scored on them.

    python -m scripts.bench_alerts [--root runs] [--out results/alerts_bench] [--only NAME ...]

Each run is `python -m trainer.train experiment=alerts_bench <overrides>` (conf/experiment/
alerts_bench.yaml): finished runs (DONE) are skipped, so rerunning the command resumes the
benchmark. Labels come from the loss curves alone (analysis/study/alert_bench.py, docs/alerts.md).
Writes summary.json and alerts_bench.png under --out and prints the tables of the README.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from analysis.spectral.plots import alert_bench_figure
from analysis.study.alert_bench import (
    RunRecord,
    early_logit,
    first_rule_fire,
    grad_spike,
    label_run,
    load_run,
    loss_spike,
    score,
)
from trainer.run_dir import RunDirectory, run_id_from_overrides

BASE_LR = 3e-3  # conf/optim/adamw.yaml
VARIANTS = ("mha", "gqa", "mla", "kv_shift", "mla_kv_shift")
LR_FACTORS = (10, 30, 100)
SEEDS = (1337, 1338)
RULES = ("logit_growth", "spikes", "layer_localised", "rank_collapse", "runaway_norm", "non_finite")
WORTSMAN_STEP, WORTSMAN_THRESHOLD = 40, 50.0  # 40% into the 100-step warmup (their 2k of 5k); the rule's max_logit


def warn_rules() -> list[str]:
    """The rules conf/spectral/default.yaml sets to WARN or ERROR: what "any WARN" means now."""
    rules = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "spectral" / "default.yaml").rules
    return [name for name, params in rules.items() if params.level in ("WARN", "ERROR")]


def first_warn(run: RunRecord, rules: list[str]) -> int | None:
    """Step of the first fire of any of `rules` (at whatever level the run logged it)."""
    steps = [s for s in (first_rule_fire(run, rule) for rule in rules) if s is not None]
    return min(steps) if steps else None


def lr(factor: float) -> str:
    return f"optim.lr={BASE_LR * factor:.3g}"


def runs() -> dict[str, dict]:
    """name -> {overrides, group, variant, factor}; group: healthy | lr_sweep | other | intervention."""
    out = {}
    for v in VARIANTS:
        for seed in SEEDS:
            out[f"{v}-x1-s{seed}"] = {"overrides": [f"attention={v}", f"seed={seed}"], "group": "healthy"}
        for f in LR_FACTORS:
            out[f"{v}-x{f}"] = {"overrides": [f"attention={v}", lr(f)], "group": "lr_sweep"}
    for f in (30, 100):  # high LR without weight decay, attention logits held by QK-norm: not logit growth
        out[f"mha-qknorm-nowd-x{f}"] = {"overrides": ["attention=mha", lr(f), "model.qk_norm=true",
                                                      "optim.weight_decay=0"], "group": "other"}
    for f in (1, 10, 30):
        out[f"mha-qknorm-x{f}"] = {"overrides": ["attention=mha", lr(f), "model.qk_norm=true"],
                                   "group": "intervention"}
        for v in ("mha", "mla"):
            out[f"{v}-qkclip-x{f}"] = {"overrides": [f"attention={v}", lr(f), "qk_clip=on"], "group": "intervention"}
            out[f"{v}-qkclip30-x{f}"] = {"overrides": [f"attention={v}", lr(f), "qk_clip=on", "qk_clip.tau=30"],
                                         "group": "intervention"}
            out[f"{v}-qkclipbound-x{f}"] = {"overrides": [f"attention={v}", lr(f), "qk_clip=on",
                                                          "qk_clip.source=bound"], "group": "intervention"}
    for name, spec in out.items():
        spec["variant"] = spec["overrides"][0].split("=")[1]
        spec["factor"] = int(name.split("-x")[1].split("-")[0])
    return out


def run_dir(root: Path, overrides: list[str]) -> Path:
    """The run directory trainer.train gives these overrides (Hydra sorts them into the name)."""
    return root / "alerts_bench" / run_id_from_overrides(",".join(sorted(["experiment=alerts_bench", *overrides])))


def train(root: Path, name: str, overrides: list[str]) -> float:
    """Run one benchmark job unless it is DONE; -> its wall time in seconds (0 when skipped)."""
    if RunDirectory(run_dir(root, overrides)).is_done():
        return 0.0
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "trainer.train", "experiment=alerts_bench", *overrides, f"paths.root={root}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"  {name}: exit {proc.returncode} in {seconds:.0f} s", flush=True)
    if not RunDirectory(run_dir(root, overrides)).is_done():
        raise RuntimeError(f"{name} did not finish (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def markdown(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs", help="paths.root of the benchmark's runs")
    parser.add_argument("--out", default="results/alerts_bench", help="folder for summary.json and the figure")
    parser.add_argument("--only", nargs="*", help="run only these named jobs (no summary)")
    args = parser.parse_args()
    root, out = Path(args.root), Path(args.out)
    specs = runs()
    wall = {}
    for name, spec in specs.items():
        if args.only is None or name in args.only:
            wall[name] = train(root, name, spec["overrides"])
    if args.only is not None:
        return

    records = {name: load_run(run_dir(root, spec["overrides"]), name) for name, spec in specs.items()}
    best = {}
    for v in VARIANTS:  # the best learning rate of each variant (healthy seeds and the sweep)
        pool = [n for n, s in specs.items() if s["variant"] == v and s["group"] in ("healthy", "lr_sweep")]
        best[v] = min(pool, key=lambda n: records[n].final_val)
    labels = {name: label_run(records[name], records[best[spec["variant"]]]) for name, spec in specs.items()}

    detect = [n for n, s in specs.items() if s["group"] in ("healthy", "lr_sweep", "other")]
    other = {n for n in detect if specs[n]["group"] == "other"}
    warn = warn_rules()
    detectors = {"any WARN (" + ", ".join(warn) + ")": lambda r: first_warn(r, warn)}
    for rule in RULES:
        detectors[f"rule {rule}"] = lambda r, rule=rule: first_rule_fire(r, rule)
    detectors["baseline: loss spike"] = loss_spike
    detectors["baseline: grad-norm spike"] = grad_spike
    detectors[f"baseline: max logit at step {WORTSMAN_STEP}"] = lambda r: early_logit(r, WORTSMAN_STEP,
                                                                                        WORTSMAN_THRESHOLD)
    scores = [score(d, {n: fn(records[n]) for n in detect}, {n: labels[n] for n in detect}, other)
              for d, fn in detectors.items()]

    run_rows = []
    for name in detect:
        r, lab = records[name], labels[name]
        run_rows.append([name, lab.label, lab.fail_step if lab.fail_step is not None else "-", f"{r.final_val:.2f}",
                         f"{r.max_logit.max():.3g}", first_warn(r, warn) if first_warn(r, warn) is not None else "-"])
    score_rows = [[s.detector, f"{s.warned}/{s.failing}", f"{s.false_alarms}/{s.healthy}",
                   f"{s.median_lead:.0%}" if s.median_lead is not None else "-", f"{s.claims_other}/{s.other}"]
                  for s in scores]
    ref = {v: records[f"{v}-x1-s{SEEDS[0]}"].final_val for v in ("mha", "mla")}
    rescue_rows = []
    for v, kind in (("mha", "none"), ("mha", "qknorm"), ("mha", "qkclip"), ("mha", "qkclip30"), ("mha", "qkclipbound"),
                    ("mla", "none"), ("mla", "qkclip"), ("mla", "qkclip30"), ("mla", "qkclipbound")):
        row = [v, kind]
        for f in (1, 10, 30):
            name = f"{v}-x{f}" if kind == "none" else f"{v}-{kind}-x{f}"
            if kind == "none" and f == 1:
                name = f"{v}-x1-s{SEEDS[0]}"
            row.append(f"{records[name].final_val:.3f}")
        rescue_rows.append(row)

    print("\nRuns (detection set):")
    print(markdown(run_rows, ["run", "label", "failing from step", "final val", "max logit", "first WARN"]))
    print("\nDetectors:")
    print(markdown(score_rows, ["detector", "failing warned before failure", "healthy runs fired on",
                                "median lead", "non-QK failures fired on"]))
    print(f"\nInterventions (final val loss; default-LR reference mha {ref['mha']:.3f}, mla {ref['mla']:.3f}):")
    print(markdown(rescue_rows, ["variant", "intervention", "x1", "x10", "x30"]))

    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]},
        "wall_seconds": wall,
        "runs": {n: {**specs[n], **asdict(labels[n]), "final_val": records[n].final_val,
                     "max_logit": float(records[n].max_logit.max()), "first_warn": first_warn(records[n], warn),
                     "alerts": [{k: a[k] for k in ("rule", "level", "step")} for a in records[n].alerts]}
                 for n in specs},
        "best_lr_run": best,
        "warn_rules": warn,
        "detectors": [asdict(s) for s in scores],
        "interventions": {"header": ["variant", "intervention", "x1", "x10", "x30"], "rows": rescue_rows},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    fig = alert_bench_figure({n: records[n] for n in detect}, {n: labels[n] for n in detect})
    fig.savefig(out / "alerts_bench.png", dpi=110)
    print(f"\nwrote {out / 'summary.json'} and {out / 'alerts_bench.png'}")


if __name__ == "__main__":
    main()
