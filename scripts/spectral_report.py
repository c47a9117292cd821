"""A run's report as one self-contained HTML file (figures inlined): loss and validation loss with the
alerts marked, the alerts table, each QK kind's ESD against the null on log axes, the layer x head
heatmap, per-layer histories, the attention-logit checks and the run's config.

    python scripts/spectral_report.py runs/default/default [--out FILE]

The logic is trainer/run_report.py.
"""

import argparse
import sys
from pathlib import Path

from trainer.run_report import build_run_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<experiment>/<overrides>)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    try:
        path = build_run_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
