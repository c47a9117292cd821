"""Helpers of the surgery tests (LASER, Q/K pruning, circuits): run a tool, check its checkpoint."""

import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LambdaCallback

from tests.conftest import Finished, run_module
from trainer.checkpoints import run_datamodule
from trainer.lit_gpt import LitGPT


def run_tool(module: str, *overrides: str) -> Finished:
    """Run a post-training entry point (`python -m trainer.<tool>`) in the test process."""
    return run_module(module, *overrides)


def check_edited_checkpoint(path: Path, source: Path) -> LitGPT:
    """The edited checkpoint loads like a training one, generates, and Lightning's Trainer resumes
    from it (its weights are the ones training continues from) on the source run's data."""
    module = LitGPT.load_from_checkpoint(path, map_location="cpu").eval()
    out = module.model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 8)
    edited = {k: v.clone() for k, v in module.state_dict().items()}
    step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    seen = {}

    def record(trainer: L.Trainer, lit: LitGPT) -> None:
        seen.update({k: v.detach().clone() for k, v in lit.state_dict().items()})

    trainer = L.Trainer(accelerator="cpu", max_steps=step + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[LambdaCallback(on_train_start=record)])
    resumed = LitGPT.load_from_checkpoint(path, map_location="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the source run's callbacks are absent here, which Lightning mentions
        trainer.fit(resumed, datamodule=run_datamodule(source), ckpt_path=path)
    assert trainer.global_step == step + 1
    assert all(torch.equal(seen[k], v) for k, v in edited.items())
    return module
