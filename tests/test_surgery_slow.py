"""Attention-matrix pruning on a briefly trained KJV model: the learned mask keeps the attention maps
closer than magnitude pruning at every studied sparsity (minutes; the full study is
`python -m scripts.surgery_study kjv --run`)."""

import json
from pathlib import Path

import pytest

from tests.conftest import run_train
from tests.surgery_helpers import run_tool


@pytest.mark.slow
def test_learned_mask_beats_magnitude_on_a_trained_model(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("trainer.max_steps=300", "logger=csv", "spectral=off", f"paths.root={tmp_path}",
                     f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = next(tmp_path.glob("default/*/checkpoints/last.ckpt"))
    out = tmp_path / "prune"
    proc = run_tool("trainer.prune", f"ckpt='{ckpt}'", f"out={out}", "study=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["method"], r["sparsity"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    for s in (0.3, 0.5, 0.7):
        learned, magnitude, wanda = (rows[(m, s)] for m in ("learned", "magnitude", "wanda"))
        print(f"sparsity {s}: attn err learned {learned['attn_err']:.4f}, magnitude {magnitude['attn_err']:.4f}, "
              f"wanda {wanda['attn_err']:.4f}; ppl {learned['val_ppl']:.3f} / {magnitude['val_ppl']:.3f} / "
              f"{wanda['val_ppl']:.3f}")
        assert learned["attn_err"] < magnitude["attn_err"]
        assert learned["attn_err_e2e"] < magnitude["attn_err_e2e"]
    assert rows[("learned", 0.7)]["attn_err"] > rows[("learned", 0.3)]["attn_err"] > 0  # error grows with sparsity
