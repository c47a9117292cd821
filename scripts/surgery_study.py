"""The surgery studies of issue 6: run the three tools and print their results as markdown tables.

    python -m scripts.surgery_study kjv --ckpt RUN/checkpoints/last.ckpt [--run]
    python -m scripts.surgery_study tasks [--steps 800] [--run]

`kjv`: LASER (`trainer.laser`, default grid), Q/K pruning (`trainer.prune study=true`: learned,
magnitude and Wanda at 30/50/70%) and K-MSHC (`trainer.circuits`) on a checkpoint of the
default run. `tasks`: write the agreement + bracket training text (`analysis.surgery.tasks.task_corpus`,
the evaluation pairs left out), train the default model on it (`trainer.train data=files`),
and search both tasks' circuits on that checkpoint. Without --run each part only summarises
what the tools already wrote (RUN/laser, RUN/prune, RUN/circuits). Every step is one of the
project's commands, so the tables can be reproduced by hand.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from analysis.surgery.tasks import agreement_pairs, bracket_pairs, task_corpus

ROOT = Path(__file__).resolve().parents[1]


def tool(module: str, *overrides: str) -> None:
    """`python -m <module> <overrides>` from the repository root (fails loudly)."""
    print(f"$ python -m {module} {' '.join(overrides)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, check=True,
                   env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})


def ckpt_arg(ckpt: Path) -> str:
    return f"ckpt='{ckpt}'"  # run directory names hold '=' and ','


# -------------------------------------------------------------------------------- tables


def laser_table(result: dict) -> list[str]:
    rows, base, verdict = result["rows"], result["base"], result["verdict"]
    lines = [f"base: val loss {base['val_loss']:.4f}, held-out loss {base['test_loss']:.4f}, "
             f"held-out acc {base['test_acc']:.4f} ({result['n_blocks']} blocks of {result['block_size']}: "
             f"first 20% select, last 80% report)", "",
             "Grid, held-out loss minus base (rows τ, ℓ; columns ρ):", ""]
    grid = [r for r in rows if r["kind"] == "grid"]
    rhos = sorted({r["rho"] for r in grid}, reverse=True)
    lines += ["| τ | ℓ | " + " | ".join(f"ρ={rho:g}" for rho in rhos) + " |", "|---|---|" + "---|" * len(rhos)]
    for tau in dict.fromkeys(r["tau"] for r in grid):
        for layer in sorted({r["layer"] for r in grid if r["tau"] == tau}):
            here = [r for r in grid if (r["tau"], r["layer"]) == (tau, layer)]
            cells = {r["rho"]: r["test_loss"] - base["test_loss"] for r in here}
            lines.append(f"| {tau} | {layer} | " + " | ".join(f"{cells[rho]:+.4f}" for rho in rhos) + " |")
    lines += ["", "Best by validation loss, RMT (Marchenko-Pastur edge) and greedy composition:", "",
              "| kind | τ | ℓ | ρ | val loss | held-out loss | held-out acc |", "|---|---|---|---|---|---|---|"]
    top = sorted(grid, key=lambda r: r["val_loss"])[:5]
    rmt = sorted((r for r in rows if r["kind"] == "rmt"), key=lambda r: r["val_loss"])[:3]
    for r in [*top, *rmt, *(r for r in rows if r["kind"] in ("rmt_all", "compose"))]:
        rho = "-" if r["rho"] is None else f"{r['rho']:.3g}"
        lines.append(f"| {r['kind']} | {r['tau']} | {r['layer']} | {rho} | {r['val_loss']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['test_acc']:.4f} |")
    lines += ["", f"selected on val: {result['best']['kind']} {result['best']['interventions']}; "
              f"improves val: {verdict['best_improves_val']}, improves held-out: {verdict['best_improves_heldout']} "
              f"(held-out gain {verdict['heldout_gain']:+.4f}); grid points better than base on held-out: "
              f"{verdict['grid_points_better_heldout']} of {verdict['grid_points']} (oracle, not selectable: "
              f"{verdict['oracle_best_heldout']}, gain {verdict['oracle_heldout_gain']:+.4f})"]
    return lines


def prune_table(result: dict) -> list[str]:
    lines = ["| method | sparsity | attn err (layer-local) | attn err (end to end) | val ppl |",
             "|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["sparsity"], r["method"])):
        lines.append(f"| {r['method']} | {r['sparsity']:.1f} | {r['attn_err']:.4f} | {r['attn_err_e2e']:.4f} | "
                     f"{r['val_ppl']:.3f} |")
    by = {(r["method"], r["sparsity"]): r for r in result["rows"]}
    wins = [s for (m, s) in by if m == "learned" and ("magnitude", s) in by
            and by[("learned", s)]["attn_err"] < by[("magnitude", s)]["attn_err"]]
    total = sum(1 for (m, s) in by if m == "learned" and ("magnitude", s) in by)
    lines += ["", f"learned below magnitude on held-out attention-map error at {len(wins)} of {total} sparsities"]
    return lines


def circuits_table(result: dict) -> list[str]:
    eps = result["search"]["eps"]
    lines = [f"ε = {eps}, ablation {result['search']['ablation']}, metric {result['search']['metric']}", "",
             "| task | S(M) | S(B) | circuit (layer, head) | S(H) | restored | S(M∖H) | dropped on removal | strong |"
             " certified |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["circuits"]:
        lines.append(f"| {c['task']} | {c['score_full']:.3f} | {c['score_ablated']:.3f} | {c['heads']} | "
                     f"{c['score_circuit']:.3f} | {c['recovered']:.2f} | {c['score_complement']:.3f} | "
                     f"{c['removal_drop']:.2f} | {c['strong']} | {c['certified_minimal']} |")
    lines += ["", "| tasks | Jaccard | weighted Jaccard | shared | shared strong | shared weak |",
              "|---|---|---|---|---|---|"]
    for o in result["overlap"]:
        jac = "-" if o["jaccard"] is None else f"{o['jaccard']:.3f}"
        wjac = "-" if o["weighted_jaccard"] is None else f"{o['weighted_jaccard']:.3f}"
        lines.append(f"| {' / '.join(o['tasks'])} | {jac} | {wjac} | {o['shared']} | {o['shared_strong']} | "
                     f"{o['shared_weak']} |")
    return lines


def report(run_dir: Path, parts: tuple[tuple[str, str, object], ...]) -> str:
    out = []
    for title, rel, table in parts:
        path = run_dir / rel
        out += [f"\n## {title} ({path})\n"]
        out += table(json.loads(path.read_text())) if path.exists() else [f"({path} not found)"]
    return "\n".join(out)


# --------------------------------------------------------------------------------- studies


def kjv_study(ckpt: Path, run: bool, tasks: list[str]) -> str:
    """LASER, the pruning study and circuits on a checkpoint of the default (KJV) run."""
    if run:
        tool("trainer.laser", ckpt_arg(ckpt))
        tool("trainer.prune", ckpt_arg(ckpt), "study=true")
        tool("trainer.circuits", ckpt_arg(ckpt), f"tasks=[{','.join(tasks)}]")
    return report(ckpt.resolve().parent.parent, (
        ("LASER", "laser/results.json", laser_table), ("Q/K pruning", "prune/results.json", prune_table),
        ("K-MSHC", "circuits/circuits.json", circuits_table)))


def tasks_study(root: Path, steps: int, n_lines: int, n_pairs: int, run: bool) -> str:
    """Train the default model on agreement + bracket text, then K-MSHC on both tasks."""
    corpus = (root / "corpora" / f"agreement_brackets_{n_lines}.txt").resolve()
    held_out = agreement_pairs(n_pairs, seed=0) + bracket_pairs(n_pairs, seed=0)  # what trainer.circuits scores
    if run:
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("\n".join(task_corpus(n_lines, seed=1, exclude=held_out)) + "\n")
        tool("trainer.train", "experiment_name=tasks", "data=files", f"data.files=[{corpus}]",
             f"trainer.max_steps={steps}", f"paths.root={root}")
    done = sorted((root / "tasks").glob("*/DONE"), key=lambda p: p.stat().st_mtime)
    if not done:
        return f"\n(no finished run under {root / 'tasks'}; use --run)"
    ckpt = done[-1].parent / "checkpoints" / "last.ckpt"
    if run:
        tool("trainer.circuits", ckpt_arg(ckpt), "tasks=[agreement,brackets]", f"data.n_pairs={n_pairs}",
             "data.seed=0")
    return report(ckpt.parent.parent, (("K-MSHC on the agreement + brackets model", "circuits/circuits.json",
                                        circuits_table),))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", required=True)
    k = sub.add_parser("kjv", help="LASER, pruning and circuits on a default-run checkpoint")
    k.add_argument("--ckpt", type=Path, required=True, help="<run_dir>/checkpoints/last.ckpt")
    k.add_argument("--tasks", nargs="+", default=["agreement", "brackets", "induction"], help="circuit tasks")
    t = sub.add_parser("tasks", help="train on agreement + bracket text, then circuits")
    t.add_argument("--root", type=Path, default=Path("runs"), help="paths.root of the training run")
    t.add_argument("--steps", type=int, default=800, help="training steps")
    t.add_argument("--lines", type=int, default=20000, help="lines of training text")
    t.add_argument("--pairs", type=int, default=200, help="evaluation pairs per task (left out of training)")
    for s in (k, t):
        s.add_argument("--run", action="store_true", help="run the tools first (else only summarise)")
        s.add_argument("--report", type=Path, help="also write the markdown here")
    args = p.parse_args()
    if args.study == "kjv":
        text = kjv_study(args.ckpt, args.run, args.tasks)
    else:
        text = tasks_study(args.root, args.steps, args.lines, args.pairs, args.run)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")


if __name__ == "__main__":
    main()
