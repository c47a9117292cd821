"""Generate text from a checkpoint: `python -m trainer.sample ckpt=PATH prompt="And God said"`.

The run's tokenizer encodes the prompt; the model decodes with its KV cache (temperature 0 is
greedy); each sample is printed.
"""

import sys

import hydra
import torch
from omegaconf import DictConfig

from trainer.checkpoints import load_lit_gpt, run_datamodule


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        module = load_lit_gpt(cfg.ckpt)
        tok = run_datamodule(cfg.ckpt, cfg.cache_dir).tokenizer
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    ids = tok.encode(cfg.prompt).ids or [0]
    model = module.model.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    for i in range(cfg.n):
        out = model.generate(torch.tensor([ids]), cfg.tokens, temperature=cfg.temperature,
                             top_k=cfg.top_k, generator=g)
        print(f"--- sample {i + 1}/{cfg.n}\n{tok.decode(out[0].tolist())}")


if __name__ == "__main__":
    main()
