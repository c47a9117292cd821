"""Build the qkscope W&B workspace from the keys a run logged; write it as JSON, or save it to W&B.

    python scripts/wandb_workspace.py RUN_DIR --entity ENTITY [--project qkscope] [--out FILE] [--save]

Without --save nothing leaves the machine: the definition is written to FILE (default
RUN_DIR/wandb_workspace.json). --save creates the saved view on the W&B server (needs
WANDB_API_KEY and a network) and prints its URL. The logic is trainer/wandb_workspace.py.
"""

import argparse
import os
import sys
from pathlib import Path

import wandb_workspaces.workspaces as ws
from pydantic import TypeAdapter

from trainer.wandb_workspace import build_workspace, run_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory with W&B files (runs/<experiment>/<overrides>)")
    parser.add_argument("--entity", required=True, help="your W&B user or team")
    parser.add_argument("--project", default="qkscope", help="the W&B project (logger.wandb.project)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default RUN_DIR/wandb_workspace.json)")
    parser.add_argument("--save", action="store_true", help="save the workspace to the W&B server")
    args = parser.parse_args(argv)
    keys = run_keys(args.run_dir)
    if not keys:
        print(f"error: {args.run_dir} has no W&B history (wandb/*-run-*/run-*.wandb)", file=sys.stderr)
        return 2
    workspace = build_workspace(keys, args.entity, args.project)
    out = args.out or args.run_dir / "wandb_workspace.json"
    out.write_bytes(TypeAdapter(ws.Workspace).dump_json(workspace, indent=1))
    panels = sum(len(s.panels) for s in workspace.sections)
    print(f"workspace: {len(workspace.sections)} sections, {panels} panels -> {out}")
    if args.save:
        if not os.environ.get("WANDB_API_KEY"):
            print("error: --save needs WANDB_API_KEY (and a network); the definition is in the JSON", file=sys.stderr)
            return 2
        print(f"saved: {workspace.save().url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
