"""LASER on a checkpoint: `python -m trainer.laser ckpt=PATH [out=DIR] [search.taus=[...]]`.

Compose the config, load the checkpoint and its held-out blocks, run the search
(analysis/surgery/laser.py), write the table, the plot and the best candidate's checkpoint.
"""

import logging
import sys
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
from hydra.utils import instantiate
from omegaconf import DictConfig

from analysis.surgery.laser import apply_interventions
from analysis.surgery.laser_search import plot_grid, run_search
from trainer.checkpoints import heldout_blocks, load_lit_gpt, save_edited, write_csv, write_results

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="laser")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    try:
        search = instantiate(cfg.search, _convert_="all")
        module = load_lit_gpt(cfg.ckpt)
        x, y = heldout_blocks(cfg.ckpt, cfg.eval.n_blocks, cfg.eval.cache_dir)
        result = run_search(module.model, x, y, search)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    verdict = result.verdict()
    write_csv(out / "results.csv", result.rows)
    write_results(out / "results.json", {"ckpt": str(cfg.ckpt), "n_blocks": len(x), "block_size": x.shape[1],
                                      "search": vars(search), "skipped_taus": result.skipped_taus,
                                      "verdict": verdict, "base": result.base, "best": result.best,
                                      "composed": [vars(i) for i in result.composed], "rows": result.rows})
    fig = plot_grid(result.rows, title=f"LASER: {Path(cfg.ckpt).name}")
    fig.savefig(out / "laser.png", dpi=120)
    plt.close(fig)

    applied = apply_interventions(module.model, result.best_interventions, search.method)
    save_edited(module, cfg.ckpt, out / "laser.ckpt", note={"tool": "laser", "applied": applied, "verdict": verdict})
    if result.skipped_taus:
        log.warning("matrix types not in this model, skipped: %s", result.skipped_taus)
    b, best = result.base, result.best
    log.info("base: val loss %.4f, held-out loss %.4f acc %.4f", b["val_loss"], b["test_loss"], b["test_acc"])
    log.info("best (%s %s): val loss %.4f, held-out loss %.4f acc %.4f -> %s", best["kind"], best["interventions"],
             best["val_loss"], best["test_loss"], best["test_acc"], out / "laser.ckpt")
    log.info("held-out %s improved by the val-selected edit: %s; grid points better on held-out: %d of %d",
             verdict["metric"], verdict["best_improves_heldout"], verdict["grid_points_better_heldout"],
             verdict["grid_points"])


if __name__ == "__main__":
    main()
