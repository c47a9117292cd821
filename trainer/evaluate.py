"""Score a checkpoint: `python -m trainer.evaluate ckpt=PATH [files=[a.txt,...]]`.

Next-token loss, perplexity and top-1 accuracy on the run's own validation split, or on any text
files (read like `data=files`, tokenized with the run's tokenizer, cut into the run's block size).
Prints one line and writes <out>/results.json.
"""

import logging
import math
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from analysis.surgery.scoring import block_metrics
from trainer.checkpoints import heldout_blocks, load_lit_gpt, run_datamodule, token_blocks, write_results
from trainer.corpus import CorpusError, encode_documents, read_documents

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        module = load_lit_gpt(cfg.ckpt)
        if cfg.files:
            dm = run_datamodule(cfg.ckpt, cfg.cache_dir)
            files = [Path(f) for f in cfg.files]
            docs = read_documents(files, cfg.text_field, Path(dm.config.cache_dir) / "hf")
            tokens = encode_documents(dm.tokenizer, docs, dtype="int64")
            x, y = token_blocks(tokens, dm.config.block_size, cfg.n_blocks, f"{[str(f) for f in files]}")
            source = [str(f) for f in files]
        else:
            x, y = heldout_blocks(cfg.ckpt, cfg.n_blocks, cfg.cache_dir)
            source = "the run's validation split"
    except (FileNotFoundError, ValueError, CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    loss, acc = block_metrics(module.model.eval(), x, y, cfg.batch_size)
    result = {"ckpt": str(cfg.ckpt), "data": source, "n_blocks": len(x), "block_size": x.shape[1],
              "loss": float(loss.mean()), "ppl": math.exp(float(loss.mean())), "acc": float(acc.mean())}
    write_results(Path(cfg.out) / "results.json", result)
    print(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  acc {result['acc']:.4f}  on {len(x)} blocks of "
          f"{x.shape[1]} tokens of {source if isinstance(source, str) else ', '.join(source)}")


if __name__ == "__main__":
    main()
