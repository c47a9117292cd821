"""module.compile: the compiled training step computes the eager one, across resumes both ways, for every variant."""

import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import run_train
from tests.reliability_runs import alert_records, csv_state, max_state_difference, run_dir_of, train_forked
from tests.test_train import VARIANTS
from trainer.checkpoint_io import verify_checkpoint

FLOAT_NOISE = 1e-4  # fused float32 kernels round differently from eager ones; 16 steps stay far below this


def test_a_run_resumes_compiled_from_an_eager_checkpoint_and_back(reference: Path, corpus_cache: Path,
                                                                  tmp_path: Path) -> None:
    """Eager steps 1-6 (killed: resumes from step 4), compiled steps 5-10 (killed: resumes from 8), eager to 16:
    the records and final state equal the uninterrupted eager run's within float noise."""
    eager = train_forked(tmp_path, corpus_cache, "logger=csv", kill="6")
    assert eager.returncode == -signal.SIGKILL, eager.output[-3000:]
    last = run_dir_of(tmp_path) / "checkpoints" / "last.ckpt"
    assert verify_checkpoint(last)["global_step"] == 4
    compiled = train_forked(tmp_path, corpus_cache, "logger=csv", "module.compile=true", kill="10")
    assert compiled.returncode == -signal.SIGKILL, compiled.output[-3000:]
    assert f"resume from {last}" in compiled.output and verify_checkpoint(last)["global_step"] == 8
    assert compiled.output.count("torch.compile: first training step") == 1
    assert compiled.output.count("torch.compile: first validation step") == 1  # validation at step 8
    back = train_forked(tmp_path, corpus_cache, "logger=csv")
    assert back.returncode == 0, back.output[-3000:]
    assert "torch.compile" not in back.output

    run = run_dir_of(tmp_path)  # one directory: module.compile does not name a different run
    assert run.name == reference.name
    ref, got = csv_state(reference), csv_state(run)
    assert ref.keys() == got.keys()
    losses = [(k, float(v), float(got[k])) for k, v in ref.items() if k[1] in ("train/loss", "val/loss")]
    assert len(losses) >= 16 and max(abs(a - b) for _, a, b in losses) <= FLOAT_NOISE, losses
    ckpt = Path("checkpoints") / "last.ckpt"
    assert max_state_difference(reference / ckpt, run / ckpt) <= FLOAT_NOISE
    assert torch.load(last, weights_only=True)["state_dict"].keys() == torch.load(reference / ckpt, weights_only=True)[
        "state_dict"].keys()  # the eager module's names: no _orig_mod. prefix, no compiled wrapper
    assert [(a["rule"], a["step"]) for a in alert_records(run)] == [
        (a["rule"], a["step"]) for a in alert_records(reference)]


@pytest.mark.slow
def test_every_variant_trains_compiled_through_the_entry_point(tmp_path: Path, corpus_cache: Path) -> None:
    proc = run_train("-m", f"attention={','.join(VARIANTS)}", "module.compile=true", "trainer=debug",
                     "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=csv", "data.val_batches=2",
                     "model.n_layer=2", "model.d_model=64", "spectral.every_n_steps=2", f"paths.root={tmp_path}",
                     f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for name in VARIANTS:
        assert "first training step" in output and f"attention={name} graph" in output, name
        (run_dir,) = (tmp_path / "default").glob(f"attention={name},*")
        assert (run_dir / "DONE").exists()
        assert len(list((run_dir / "spectra").glob("step*.npz"))) == 3  # the probe reads the eager module


def test_a_compile_failure_names_the_variant_and_the_way_out(tmp_path: Path, corpus_cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor without a working C++ compiler (a machine without gcc): one error line naming the variant."""
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # no compiled kernel from an earlier test
    proc = run_train("attention=mla", "module.compile=true", "trainer=debug", "trainer.max_steps=2",
                     "logger=csv", "model.n_layer=1", "model.d_model=64", f"paths.root={tmp_path}",
                     f"paths.cache_dir={corpus_cache}")
    assert proc.returncode == 1
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "torch.compile failed for attention=mla" in line and "module.compile=false" in line
    assert "Traceback" not in proc.stderr
    print(line)
