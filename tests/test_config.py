"""Every shipped config composes and validates; bad overrides fail before any work, naming the key."""

import contextlib
import csv
import dataclasses
import json
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import wandb
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from callbacks.spectral import SpectralHealthCallback
from models.config import ConfigError
from tests.conftest import CONF, compose_train, run_train, wandb_files
from trainer.config import validate
from trainer.corpus import kjv_path
from trainer.data import DataConfig, DataSource, TextDataModule
from trainer.lit_gpt import LitGPT
from trainer.loggers import ResumableCSVLogger
from trainer.wandb_records import history, run_id


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


def leaves(node: object, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """{key path: value} of a nested dict; a list is one value."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {path: v for k, child in node.items() for path, v in leaves(child, (*prefix, str(k))).items()}


def raw(cfg: DictConfig) -> dict:
    """The composed config as plain containers, interpolations unresolved (`${hydra:...}` needs a running app)."""
    return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)


def check_logger(cfg: DictConfig, name: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loggers the entry point would build: each one logs a row to its own files in the run directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = instantiate(cfg.logger)
    try:
        assert set(loggers) == {"none": set(), "csv": {"csv"}, "wandb": {"wandb"}}[name]
        for logger in loggers.values():
            logger.log_metrics({"train/loss": 1.5}, step=3)
        if name == "csv":
            logger = loggers["csv"]
            assert isinstance(logger, ResumableCSVLogger) and Path(logger.log_dir) == run_dir / "csv"
            logger.save()
            with open(run_dir / "csv" / "metrics.csv", newline="") as f:
                assert list(csv.DictReader(f)) == [{"step": "3", "train/loss": "1.5"}]
        if name == "wandb":
            logger = loggers["wandb"]
            assert isinstance(logger, WandbLogger)  # W&B started (no fallback to CSV)
            run = logger.experiment
            assert run.offline and run.settings.mode == "offline"
            assert (run.name, run.project, run.group) == ("test", cfg.logger.wandb.project, cfg.experiment_name)
            assert (run_dir / "wandb_run_id").read_text().strip() == run.id
            assert Path(run.dir).is_relative_to(run_dir / "wandb")
    finally:
        for logger in loggers.values():
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()
        if name == "wandb":  # stop this process's W&B service, as tests/conftest.py run_train does
            with contextlib.suppress(SystemExit):
                wandb.teardown()
            os.environ.pop("WANDB_SERVICE", None)
    if name == "wandb":  # the finished run's transaction log holds its id and the row
        (log_file,) = wandb_files(run_dir)
        assert run_id(log_file) == (run_dir / "wandb_run_id").read_text().strip()
        assert [{k: v for k, v in row.items() if not k.startswith("_")} for row in history(log_file)] == [
            {"train/loss": 1.5, "trainer/global_step": 3}]


def check_data(cfg: DictConfig, name: str, corpus: Path) -> None:
    """The DataModule: its checked config is the composed one; the shipped KJV is found (not read: tokenizing
    4.3 MB takes minutes), a user's text file is tokenized into next-token batches."""
    dm = instantiate(cfg.data)
    assert isinstance(dm, TextDataModule) and isinstance(dm.config, DataConfig)
    assert dm.corpus is None  # nothing read or written before prepare_data
    c = dm.config
    assert c.source == DataSource(name)
    for key in ("text_field", "vocab_size", "block_size", "batch_size", "val_fraction", "val_batches",
                "num_workers", "seed", "cache_dir"):
        assert getattr(c, key) == cfg.data[key], key
    if name == "kjv":
        (path,) = c.corpus_files()
        assert path == kjv_path() and path.name == "kjv.jsonl" and path.stat().st_size > 4_000_000
        with open(path) as f:
            assert json.loads(f.readline())[c.text_field] == "In the beginning God created the heaven and the earth."
        return
    assert c.corpus_files() == [corpus]
    dm.prepare_data()
    assert dm.corpus is not None and Path(dm.corpus.dir).is_relative_to(Path(c.cache_dir))
    assert dm.corpus.n_val_tokens > 2 * c.block_size and dm.corpus.n_train_tokens > 10 * dm.corpus.n_val_tokens
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (c.batch_size, c.block_size) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and 0 <= int(x.min()) and int(x.max()) < c.vocab_size
    n_val_blocks = min(len(range(0, dm.corpus.n_val_tokens - c.block_size - 1, c.block_size)),
                       c.val_batches * c.batch_size)  # whole held-out blocks, at most data.val_batches batches
    assert sum(len(xv) for xv, _ in dm.val_dataloader()) == n_val_blocks
    tok = dm.tokenizer
    assert tok.get_vocab_size() == c.vocab_size
    assert tok.decode(tok.encode("In the beginning God created").ids) == "In the beginning God created"


def check_module(cfg: DictConfig, root: Path) -> None:
    """The LightningModule: a GPT of the configured size and attention, AdamW and the warmup schedule as set."""
    module = instantiate(cfg.module)
    assert isinstance(module, LitGPT)
    model = module.model.config
    assert model.attention.name.value == cfg.model.attention.name
    for key in ("n_layer", "d_model", "n_head", "vocab_size", "block_size", "tie_embeddings"):
        assert getattr(model, key) == cfg.model[key], key
    assert len(module.model.blocks) == cfg.model.n_layer and len(module.qk_factors()) == cfg.model.n_layer
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params > 0 and module.model.num_params(non_embedding=False) == n_params
    assert dataclasses.asdict(module.optim_config) == OmegaConf.to_container(cfg.optim, resolve=True)
    module.trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and opt["lr_scheduler"]["interval"] == "step"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = sorted(id(p) for g in optimizer.param_groups for p in g["params"])
    assert grouped == sorted(id(p) for p in module.parameters())  # every parameter in exactly one group
    assert decay["betas"] == (cfg.optim.beta1, cfg.optim.beta2) and decay["eps"] == cfg.optim.eps
    first = cfg.optim.lr / cfg.optim.warmup_steps  # step 0 of the linear warmup
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([first, first])
    assert scheduler.base_lrs == pytest.approx([cfg.optim.lr] * 2)


def check_experiment(cfg: DictConfig, name: str, overrides: list[str], run_dir: Path) -> None:
    """A preset: its own values and group switches land, nothing else changes; module and callbacks build."""
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)
    switches = {k.removeprefix("override /"): v for entry in preset.pop("defaults", []) for k, v in entry.items()}
    own_hydra = leaves(preset.pop("hydra", {}))
    own = leaves(preset)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        hydra_cfg = compose("train", overrides=[f"paths.run_dir={run_dir}", f"paths.root={run_dir.parent}",
                                                *overrides], return_hydra_config=True).hydra
    assert {g: hydra_cfg.runtime.choices[g] for g in switches} == switches
    hydra_leaves = leaves(raw(hydra_cfg))
    assert {k: hydra_leaves[k] for k in own_hydra} == own_hydra
    got = leaves(raw(cfg))
    assert {k: got[k] for k in own} == own
    # the group switches alone (no preset) compose to the same config except the preset's own values
    extra = [o for o in overrides if not o.startswith("experiment=")]
    base = leaves(raw(compose_train([*(f"{g}={m}" for g, m in switches.items()), *extra], run_dir)))
    assert {k: v for k, v in got.items() if k not in own} == {k: v for k, v in base.items() if k not in own}

    module = instantiate(cfg.module)
    model = module.model.config
    assert model.attention.name.value == cfg.model.attention.name
    assert (model.n_layer, model.d_model, model.n_head) == (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head)
    assert sum(p.numel() for p in module.parameters()) > 0
    callbacks = instantiate(cfg.callbacks)
    assert all(isinstance(c, L.Callback) for c in callbacks.values() if c is not None)
    spectral = callbacks["spectral"]
    assert isinstance(spectral, SpectralHealthCallback) and spectral.run_dir == run_dir
    assert (spectral.every_n_steps, spectral.image_every_n_checks, spectral.analyzer.null) == (
        cfg.spectral.every_n_steps, cfg.spectral.image_every_n_checks, cfg.spectral.null_model)
    assert Path(callbacks["last_checkpoint"].dirpath) == run_dir / "checkpoints"


@pytest.mark.parametrize("group", ["trainer", "callbacks", "logger", "data", "optim", "experiment"])
def test_group_members_compose(group: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "x.txt"  # data=files: a user's own text file, here 3000 verses of the shipped KJV
    if group == "data":
        with open(kjv_path()) as f:
            corpus.write_text("".join(json.loads(next(f))["text"] + "\n" for _ in range(3000)))
    for name in members(group):
        run_dir = tmp_path / name / "run"
        extra = [f"data.files=[{corpus}]"] if (group, name) == ("data", "files") else []
        if (group, name) == ("logger", "wandb"):  # conftest names the W&B run only when no logger= is given
            extra = ["logger.wandb.name=test"]
        if group == "experiment":  # a preset may switch the logger (conftest names the W&B run otherwise)
            extra = ["logger=csv"]
        cfg = compose_train([f"{group}={name}", *extra], run_dir)
        needs_gpu = group == "trainer" and cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available()
        if needs_gpu:  # refused before any work, where Lightning would fail after building everything
            with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu, but this machine has no GPU"):
                validate(cfg)
            continue
        validate(cfg)
        if group in ("callbacks", "trainer"):
            instantiate(cfg[group])
        elif group == "logger":
            check_logger(cfg, name, run_dir, monkeypatch)
        elif group == "data":
            check_data(cfg, name, corpus)
        elif group == "optim":
            check_module(cfg, run_dir)
        elif group == "experiment":
            check_experiment(cfg, name, [f"{group}={name}", *extra], run_dir)


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
