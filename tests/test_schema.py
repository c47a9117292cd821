"""The structured schema (trainer/config.py) types every top-level key: a wrong type fails when the config is
composed, naming the key; every shipped group option composes with it; the schema itself states no value."""

import dataclasses
import re
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from models.config import ConfigError, GPTConfig
from tests.conftest import compose_train
from tests.test_config import members
from trainer import config as schema
from trainer.config import validate


def _chain(e: BaseException | None) -> str:
    """The exception and its causes, as the CLI prints them (Hydra wraps OmegaConf's error)."""
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__
    return "\n".join(out)


# One wrong-typed override per formerly loose key (and a few nested nodes): refused by compose itself, before
# validate() or any instantiate, with OmegaConf's message naming the full key.
WRONG_TYPES = [
    (["module.sample_tokens=abc"], "module.sample_tokens"),
    (["module.model=abc"], "module.model"),
    (["trainer.max_steps=abc"], "trainer.max_steps"),
    (["trainer.precision=[1]"], "trainer.precision"),
    (["callbacks.last_checkpoint.every_n_train_steps=abc"], "callbacks.last_checkpoint.every_n_train_steps"),
    (["callbacks.progress.leave=maybe"], "callbacks.progress.leave"),
    (["callbacks.spectral=5"], "callbacks.spectral"),
    (["logger.wandb=5"], "logger.wandb"),
    (["logger=csv", "logger.csv=abc"], "logger.csv"),
    (["spectral.every_n_steps=x"], "spectral.every_n_steps"),
    (["spectral.rules.spikes.k=two"], "spectral.rules.spikes.k"),
    (["spectral.actions.WARN=log"], "spectral.actions.WARN"),
    (["qk_clip=on", "qk_clip.tau=[1]"], "qk_clip.tau"),
    (["qk_clip=on", "qk_clip.every_n_steps=often"], "qk_clip.every_n_steps"),
]


@pytest.mark.parametrize(("overrides", "key"), WRONG_TYPES, ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_type_fails_at_compose_naming_the_key(overrides: list[str], key: str, tmp_path: Path) -> None:
    with pytest.raises(HydraException) as info:
        compose_train(overrides, tmp_path / "run")
    chain = _chain(info.value)
    assert re.search(rf"full_key: {re.escape(key)}\b", chain), chain


def _groups() -> list[tuple[str, str]]:
    """(group, option) for every option of every group train.yaml composes, plus the +sweep presets."""
    groups = ["model", "attention", "data", "optim", "trainer", "callbacks", "spectral", "qk_clip", "logger",
              "experiment", "sweep"]
    return [(group, name) for group in groups for name in members(group)]


def _missing(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Keys still `???`, without resolving interpolations (some need a running Hydra app)."""
    out = []
    keys = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    for key in keys:
        child = node._get_node(key)
        name = f"{prefix}{key}"
        if child._is_missing():
            out.append(name)
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_interpolation():
            out.extend(_missing(child, name + "."))
    return out


@pytest.mark.parametrize(("group", "name"), _groups(), ids=lambda v: v)
def test_every_group_option_composes_with_the_schema(group: str, name: str, tmp_path: Path) -> None:
    option = f"+{group}={name}" if group == "sweep" else f"{group}={name}"
    extra = ["data.files=[x.txt]"] if (group, name) == ("data", "files") else []
    if group == "experiment":  # a preset may switch the logger (conftest names the W&B run otherwise)
        extra = ["logger=csv"]
    cfg = compose_train([option, *extra], tmp_path / "run")
    assert _missing(cfg) == []  # every value the schema leaves MISSING is set by the YAML
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    assert OmegaConf.get_type(task.module) is schema.ModuleNode
    assert OmegaConf.get_type(task.trainer) is schema.TrainerNode
    assert OmegaConf.get_type(task.callbacks) is schema.CallbacksNode
    assert task.spectral is None or OmegaConf.get_type(task.spectral) is schema.SpectralNode
    assert task.qk_clip is None or OmegaConf.get_type(task.qk_clip) is schema.QKClipNode
    assert all(OmegaConf.is_dict(entry) and "_target_" in entry for entry in task.logger.values())
    for key in ("qk_clip", "spectral"):  # these members are the groups themselves (or null: callbacks=none)
        assert task.callbacks[key] is None or task.callbacks[key] == task[key]


def _schema_nodes() -> list[type]:
    """The schema's own dataclasses (the groups' dataclasses GPTConfig, OptimConfig, DataConfig are not)."""
    return [obj for obj in vars(schema).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)
            and obj.__module__ == schema.__name__ and obj is not schema.DataNode]


@pytest.mark.parametrize("node", _schema_nodes(), ids=lambda n: n.__name__)
def test_schema_states_no_value(node: type) -> None:
    """Values live in conf/ only: every field of a schema node is MISSING, or a schema node itself (`paths`).
    The groups model, optim and data keep their own dataclasses, whose defaults their YAML files override."""
    nodes = set(_schema_nodes())
    groups = {"model", "optim", "data"} if node is schema.TrainSchema else set()
    stated = {f.name: f.default for f in dataclasses.fields(node) if f.name not in groups
              and (f.default_factory not in nodes if f.default_factory is not dataclasses.MISSING
                   else f.default != MISSING)}
    assert stated == {}


def test_trainer_takes_other_lightning_arguments(tmp_path: Path) -> None:
    """The trainer node is open: its key set is check_trainer's (trainer/run_checks.py), not the schema's."""
    cfg = compose_train(["+trainer.enable_progress_bar=false", "trainer.strategy=ddp"], tmp_path / "run")
    assert cfg.trainer.enable_progress_bar is False and cfg.trainer.strategy == "ddp"
    validate(cfg)
    with pytest.raises(ConfigError, match=r"trainer.max_step is not a lightning.Trainer argument; did you mean "
                                          r"max_steps\?"):
        validate(compose_train(["trainer.max_step=5"], tmp_path / "run"))


def test_module_model_is_the_model_node(tmp_path: Path) -> None:
    cfg = compose_train(["model=small"], tmp_path / "run")
    assert cfg.module.model == cfg.model and OmegaConf.get_type(cfg.module.model) is GPTConfig
