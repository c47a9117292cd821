"""K-MSHC on a checkpoint: `python -m trainer.circuits ckpt=PATH tasks=[agreement,brackets]`.

Compose the config, load the checkpoint and its tokenizer, build the tasks (analysis/surgery/tasks.py),
search each task's circuit (analysis/surgery/circuits.py), write the circuits, overlaps and heatmap.
"""

import itertools
import logging
import sys
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
from hydra.utils import instantiate
from omegaconf import DictConfig

from analysis.surgery.circuits import overlap, plot_circuits, search_circuit
from analysis.surgery.tasks import build_task
from trainer.checkpoints import load_lit_gpt, run_datamodule, write_csv, write_results

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="circuits")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    try:
        search = instantiate(cfg.search, _convert_="all")
        module = load_lit_gpt(cfg.ckpt)
        tok = run_datamodule(cfg.ckpt, cfg.data.cache_dir).tokenizer
        vocab = (cfg.data.induction_low, module.model_config.vocab_size)
        tasks = [build_task(t, lambda s: tok.encode(s).ids, cfg.data.n_pairs, cfg.data.seed, cfg.data.bos, vocab)
                 for t in cfg.tasks]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    circuits = [search_circuit(module.model, data, search) for data in tasks]
    overlaps = [overlap(a, b) for a, b in itertools.combinations(circuits, 2)]
    rows = [{"task": c.task, "layer": layer, "head": head, "impact": c.impact[layer][head],
             "in_circuit": (layer, head) in c.heads, "strong": (layer, head) in c.strong}
            for c in circuits for layer in range(len(c.impact)) for head in range(len(c.impact[0]))]
    write_csv(out / "circuits.csv", rows)
    write_results(out / "circuits.json", {"ckpt": str(cfg.ckpt), "search": vars(search),
                                       "circuits": [c.summary() for c in circuits], "overlap": overlaps})
    fig = plot_circuits(circuits)
    fig.savefig(out / "circuits.png", dpi=120)
    plt.close(fig)
    for c in circuits:
        log.info("%s: S(M)=%.3f S(B)=%.3f circuit %s S(H)=%.3f (recovered %.2f), S(M∖H)=%.3f", c.task,
                 c.score_full, c.score_ablated, c.heads, c.score_circuit, c.recovered, c.score_complement)
    for o in overlaps:
        log.info("overlap %s: jaccard %.3f, weighted %.3f", o["tasks"], o["jaccard"], o["weighted_jaccard"])


if __name__ == "__main__":
    main()
