"""What a user types: --help of each entry point, and the surgery tools' one-line refusals."""

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_module
from trainer.checkpoints import run_datamodule

TOOLS = ("laser", "prune", "circuits", "evaluate", "sample")


def test_train_help_shows_examples_and_groups() -> None:
    proc = run_module("trainer.train", "--help")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert len(lines) < 60 and lines[0].startswith("Train a decoder-only transformer")
    assert "Examples:" in lines and any("python -m trainer.train -m attention=" in line for line in lines)
    assert "attention: gqa, kv_shift, mha, mla, mla_kv_shift, mla_prerope" in lines


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_help_is_the_tools_own(tool: str) -> None:
    proc = run_module(f"trainer.{tool}", "--help")
    assert proc.returncode == 0
    assert f"Usage: python -m trainer.{tool} ckpt=<run_dir>/checkpoints/last.ckpt" in proc.stdout
    assert "ckpt: ???" in proc.stdout and "attention: gqa" not in proc.stdout  # its keys, not training's groups


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_without_or_with_a_missing_checkpoint_is_one_line(tool: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args, message in (((), "error: ckpt= is required"),
                          ((f"ckpt={tmp_path / 'nope.ckpt'}",), f"error: ckpt={tmp_path / 'nope.ckpt'} is not a file")):
        proc = run_module(f"trainer.{tool}", *args)
        assert proc.returncode == 2
        assert proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == []  # no output directory was made


def test_evaluate_and_sample_a_trained_checkpoint(surgery_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = run_module("trainer.evaluate", f"ckpt='{surgery_checkpoint}'", f"out={out}", "n_blocks=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert result["n_blocks"] == 8 and result["block_size"] == 128
    assert 0 < result["loss"] < 8 and result["ppl"] == pytest.approx(math.exp(result["loss"]))
    assert f"loss {result['loss']:.4f}" in proc.stdout

    corpus = tmp_path / "psalm.txt"
    corpus.write_text("The LORD is my shepherd; I shall not want.\n" * 200)
    proc = run_module("trainer.evaluate", f"ckpt='{surgery_checkpoint}'", f"out={out}", f"files=[{corpus}]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["data"] == [str(corpus)]

    greedy = [run_module("trainer.sample", f"ckpt='{surgery_checkpoint}'", "prompt='And God said'", "tokens=12",
                         "temperature=0") for _ in range(2)]
    assert all(p.returncode == 0 for p in greedy), greedy[0].stderr[-2000:]
    text = greedy[0].stdout.split("--- sample 1/1\n", 1)[1]
    assert text.startswith("And God said") and len(text) > len("And God said")
    assert greedy[0].stdout == greedy[1].stdout  # greedy decoding is deterministic


def test_a_tool_started_elsewhere_finds_the_runs_relative_cache(surgery_checkpoint: Path, corpus_cache: Path,
                                                                 tmp_path: Path, monkeypatch, caplog) -> None:
    """A run with the default relative cache (`runs/cache`): a tool run from another directory resolves it
    against the directory the run was started from (.hydra/hydra.yaml), and does not re-tokenize."""
    run = tmp_path / "launch" / "runs" / "default" / "run"
    shutil.copytree(surgery_checkpoint.parent.parent, run)
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    config.paths.cache_dir = f"runs/{corpus_cache.name}"  # relative, as the default is
    OmegaConf.save(config, run / ".hydra" / "config.yaml")
    hydra_yaml = OmegaConf.load(run / ".hydra" / "hydra.yaml")
    hydra_yaml.hydra.runtime.cwd = str(tmp_path / "launch")
    OmegaConf.save(hydra_yaml, run / ".hydra" / "hydra.yaml")
    (tmp_path / "launch" / "runs" / corpus_cache.name).symlink_to(corpus_cache)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with caplog.at_level(logging.WARNING):
        dm = run_datamodule(run / "checkpoints" / "last.ckpt")
    assert Path(dm.config.cache_dir) == tmp_path / "launch" / "runs" / corpus_cache.name
    assert "tokenizing the corpus again" not in caplog.text and not (elsewhere / "runs").exists()
