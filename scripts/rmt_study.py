"""The seed-000 study (MHA vs MLA-PreRoPE vs MLA) at the default run's scale, started or resumed by one command.

    python -m scripts.rmt_study [--sizes tiny small] [--out results/rmt_mla] [--runs runs]
    python -m scripts.rmt_study --sizes medium          # on a GPU: model=medium trainer=gpu, one seed

Each size is a Hydra multirun of the real entry point over conf/experiment/rmt_mla.yaml (800 steps
of 32 x 128 tokens, the weight and activation forms against the rotation null): a DONE job is
skipped and a killed one resumes from its last.ckpt, so the study may take several sittings and
every rerun of this command goes on where the last one stopped.

    tiny    experiment=rmt_mla                                    3 arms x seeds 1, 2, 3
    small   ... model=small seed=1,2 experiment_name=rmt_mla_small  3 arms x seeds 1, 2
    medium  ... model=medium trainer=gpu seed=1 experiment_name=rmt_mla_medium

The arms of a size share width, depth and heads, and MLA's ranks follow from d_model, so their
parameter counts agree within a few percent (written per arm to the summary); the KV cache is
what MLA compresses, so matching it would undo the variant under study. Then
scripts/rmt_figures.py draws each size's figures into OUT/<size>/ with its table (OUT/<size>/table.md,
the README's rows), and OUT/summary.json holds every size's summary with its command and parameter counts.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(ROOT))

from analysis.study.rmt_study import markdown_table  # noqa: E402
from scripts import rmt_figures  # noqa: E402
from trainer.run_results import sweep_jobs  # noqa: E402

SIZES = {  # size -> (overrides after experiment=rmt_mla, sweep directory name)
    "tiny": ((), "rmt_mla"),
    "small": (("model=small", "seed=1,2", "experiment_name=rmt_mla_small"), "rmt_mla_small"),
    "medium": (("model=medium", "trainer=gpu", "seed=1", "experiment_name=rmt_mla_medium"), "rmt_mla_medium"),
}


def command(size: str, runs: Path) -> list[str]:
    """The entry point's command line of one size's sweep."""
    overrides, _ = SIZES[size]
    return [sys.executable, "-m", "trainer.train", "experiment=rmt_mla", *overrides, f"paths.root={runs}"]


def parameter_counts(sweep_dir: Path) -> dict[str, int]:
    """Per arm, the parameters of the model its first job was configured with."""
    from models import GPT, GPTConfig

    counts: dict[str, int] = {}
    for job in sweep_jobs(sweep_dir):
        model = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml").model, resolve=True)
        name = str(model["attention"]["name"])
        if name not in counts:
            counts[name] = sum(p.numel() for p in GPT(GPTConfig(**model)).parameters())
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="paths.root of the sweeps")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "rmt_mla", help="figures and summary.json")
    parser.add_argument("--figures-only", action="store_true", help="draw what the sweeps hold, train nothing")
    args = parser.parse_args(argv)
    summary_path = args.out / "summary.json"
    sizes = json.loads(summary_path.read_text()).get("sizes", {}) if summary_path.exists() else {}
    summary = {"sizes": sizes}  # the sizes drawn earlier stay; a file of another shape is replaced
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    failed = []
    for size in args.sizes:
        cmd = command(size, args.runs)
        if not args.figures_only:
            print("$ " + " ".join(cmd[1:]), flush=True)
            start = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
            print(f"{size}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
            if rc != 0:
                failed.append(size)
        sweep = args.runs / SIZES[size][1]
        try:
            numbers = rmt_figures.render(sweep, args.out / size)
        except FileNotFoundError as e:
            print(f"{size}: no figures yet ({e})", file=sys.stderr)
            continue
        table = markdown_table(numbers)
        (args.out / size / "table.md").write_text(table)
        print(f"\n{size}:\n{table}", flush=True)
        summary["sizes"][size] = {"command": "python -m trainer.train " + " ".join(cmd[3:-1]),
                                  "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                                  "parameters": parameter_counts(sweep), **numbers}
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {summary_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
