"""Time one spectral check per model preset (logic in analysis/study/bench.py).

    python scripts/bench_spectral.py [--out bench_spectral.json] [--presets tiny small gpt2-small]
                                     [--null product] [--repeats 5] [--weightwatcher]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.study.bench import PRESETS, format_table, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_spectral.json", help="JSON output path")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--null", default="product", help="null model: mp, product, shuffle, rotation")
    parser.add_argument("--repeats", type=int, default=5, help="cached calls per preset (median reported)")
    parser.add_argument("--weightwatcher", action="store_true", help="also time weightwatcher if installed")
    args = parser.parse_args()
    result = run(args.presets, args.null, args.repeats, args.weightwatcher)
    print(format_table(result))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
