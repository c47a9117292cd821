"""Attention-matrix pruning of a checkpoint: `python -m trainer.prune ckpt=PATH sparsity=0.5 method=learned`.

Compose the config, load the checkpoint, its calibration and held-out blocks, prune
(analysis/surgery/pruning.py), write the table, the plot and the pruned checkpoint.
"""

import dataclasses
import logging
import sys
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
from hydra.utils import instantiate
from omegaconf import DictConfig

from analysis.surgery.pruning import plot_study, prune_study
from trainer.checkpoints import heldout_blocks, load_lit_gpt, save_edited, write_csv, write_results

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    try:
        chosen = instantiate(cfg.prune, _convert_="all")
        grid = [dataclasses.replace(chosen, method=m, sparsity=s) for s in cfg.study_sparsities
                for m in cfg.study_methods] if cfg.study else []
        grid += [] if chosen in grid else [chosen]
        module = load_lit_gpt(cfg.ckpt)
        calib, _ = heldout_blocks(cfg.ckpt, cfg.calib.n_blocks, cfg.eval.cache_dir, split="train")
        x, y = heldout_blocks(cfg.ckpt, cfg.eval.n_blocks, cfg.eval.cache_dir)
        rows, pruned = prune_study(module.model, calib, x, y, grid, cfg.eval.n_attn_blocks, keep=chosen)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    write_csv(out / "results.csv", [{k: v for k, v in r.items() if k != "layers"} for r in rows])
    write_results(out / "results.json", {"ckpt": str(cfg.ckpt), "calib_blocks": len(calib), "eval_blocks": len(x),
                                      "prune": dataclasses.asdict(chosen), "rows": rows})
    fig = plot_study(rows, title=f"Q/K pruning: {Path(cfg.ckpt).name}")
    fig.savefig(out / "prune.png", dpi=120)
    plt.close(fig)

    module.model.load_state_dict(pruned.state_dict())
    layers = next(r["layers"] for r in rows if r["method"] == chosen.method and r["sparsity"] == chosen.sparsity)
    save_edited(module, cfg.ckpt, out / "pruned.ckpt",
                note={"tool": "prune", "config": dataclasses.asdict(chosen), "layers": layers})
    for r in rows:
        log.info("%-9s sparsity %.2f: attn err %.4f (e2e %.4f), val ppl %.3f", r["method"], r["sparsity"],
                 r["attn_err"], r["attn_err_e2e"], r["val_ppl"])


if __name__ == "__main__":
    main()
