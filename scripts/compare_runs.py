"""Compare the runs of a sweep: python -m scripts.compare_runs SWEEP_DIR [--out DIR]

Writes one report (index.html, PNGs and compare.json; default SWEEP_DIR/report): validation
loss curves, tokens/s, KV-cache bytes per token per layer measured on each run's model, and
spectral spikes per layer over time. The logic is trainer.run_results.build_report.
"""

import argparse
import sys
from pathlib import Path

from trainer.run_results import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory, e.g. runs/attention_variants")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    try:
        result = build_report(args.sweep_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "report"
    for run in result["runs"]:
        kv = run["kv_cache_bytes"].get("marginal")
        loss = run["val_loss"]["values"][-1] if run["val_loss"] else None
        print(f"{run['label']:<40} {run['status']:<10} val/loss={loss} tokens/s={run['tokens_per_sec']} "
              f"kv_bytes/token/layer={kv}")
    print(f"report: {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
