"""Every shipped config composes and validates; bad overrides fail before any work, naming the key."""

import re
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from hydra.utils import instantiate

from models.config import ConfigError
from tests.conftest import CONF, compose_train, run_train
from trainer.config import validate


def members(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", members("model"))
@pytest.mark.parametrize("attention", members("attention"))
def test_model_and_attention_build(model: str, attention: str, tmp_path: Path) -> None:
    cfg = compose_train([f"model={model}", f"attention={attention}"], tmp_path / "run")
    validate(cfg)
    if model == "tiny":  # building the larger presets adds seconds and checks nothing new
        module = instantiate(cfg.module)
        assert module.model.config.attention.name.value == cfg.model.attention.name
        assert len(module.model.qk_factors()) == cfg.model.n_layer


@pytest.mark.parametrize("group", ["trainer", "callbacks", "logger", "data", "optim", "experiment"])
def test_group_members_compose(group: str, tmp_path: Path) -> None:
    for name in members(group):
        extra = ["data.files=[x.txt]"] if (group, name) == ("data", "files") else []
        if group == "experiment":  # a preset may switch the logger (conftest names the W&B run otherwise)
            extra = ["logger=csv"]
        cfg = compose_train([f"{group}={name}", *extra], tmp_path / "run")
        needs_gpu = group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available()
        if needs_gpu:  # refused before any work, where Lightning would fail after building everything
            with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu, but this machine has no GPU"):
                validate(cfg)
            continue
        validate(cfg)
        if group in ("callbacks", "trainer"):
            instantiate(cfg[group])


def test_default_config_values(tmp_path: Path) -> None:
    cfg = compose_train([], tmp_path / "run")
    assert cfg.model.attention.name == "mha" and cfg.data.source == "kjv"
    assert cfg.model.vocab_size == cfg.data.vocab_size and cfg.model.block_size == cfg.data.block_size


@pytest.mark.parametrize(
    ("overrides", "exc", "message"),
    [
        (["model=small", "model.n_head=5"], ConfigError,
         r"model.n_head=5 does not divide model.d_model=256; allowed n_head for d_model=256: \[1, 2, 4, 8"),
        (["optim.lr=-0.1"], ConfigError, r"optim.lr=-0.1 is invalid: it must be > 0"),
        (["attention=gqa", "model.attention.n_kv_head=3"], ConfigError, r"model.attention.n_kv_head=3"),
        (["data.batch_size=0"], ConfigError, r"data.batch_size=0"),
        (["model.rope_base=0"], ConfigError, r"model.rope_base=0.0 is invalid: it must be > 0"),
        (["attention=mla", "model.attention.kv_lora_rank=129"], ConfigError,
         r"model.attention.kv_lora_rank=129 exceeds model.d_model=128"),
        (["attention=nope"], HydraException, r"Could not find 'attention/nope'[\s\S]*Available options"),
        (["model.attention.name=nope"], HydraException, r"Invalid value 'nope', expected one of"),
        (["model.n_layer=abc"], HydraException, r"model.n_layer"),
        (["model.n_heads=4"], HydraException, r"n_heads"),
        (["resume=sometimes"], HydraException, r"expected one of \[auto, never, must\]"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], exc: type, message: str, tmp_path: Path) -> None:
    with pytest.raises(exc) as info:
        validate(compose_train(overrides, tmp_path / "run"))
    chain, e = [], info.value  # Hydra wraps OmegaConf's error; the CLI prints the whole chain
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert re.search(message, "\n".join(chain)), chain


def test_bad_override_exits_before_work(tmp_path: Path) -> None:
    """The real entry point: non-zero exit, a message naming the key, no run directory left."""
    proc = run_train("model=small", "model.n_head=5", f"paths.root={tmp_path}")
    assert proc.returncode == 2
    assert "model.n_head=5 does not divide model.d_model=256" in proc.stderr
    assert list(tmp_path.iterdir()) == []

    proc = run_train("attention=nope", f"paths.root={tmp_path}")
    assert proc.returncode != 0 and "Available options in 'attention'" in proc.stderr
    assert list(tmp_path.iterdir()) == []
