"""Structured-config schemas (Hydra ConfigStore) and the validation run before any work.

Types and enum values are checked by OmegaConf when the config is composed or overridden;
cross-field rules (heads dividing the width, positive rates, ...) run in the dataclasses'
`__post_init__`, which `validate()` triggers by turning each group into objects.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from models.config import AttentionConfig, AttentionName, ConfigError, GPTConfig
from trainer.data import DataConfig
from trainer.lit_gpt import OptimConfig
from trainer.run_checks import check_run, check_trainer
from trainer.run_dir import run_id_from_overrides


class ResumePolicy(str, Enum):
    auto = "auto"  # continue from checkpoints/last.ckpt when it exists
    never = "never"  # start from scratch in a clean directory (the old one is moved to <dir>.previous-<k>)
    must = "must"  # fail unless checkpoints/last.ckpt exists


@dataclass
class DataNode(DataConfig):
    _target_: str = "trainer.data.TextDataModule"


@dataclass
class PathsConfig:
    root: str = "runs"
    run_dir: str = "???"
    cache_dir: str = "???"


@dataclass
class TrainSchema:
    """Every top-level key of conf/train.yaml; unknown keys are errors."""

    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataNode = field(default_factory=DataNode)
    paths: PathsConfig = field(default_factory=PathsConfig)
    module: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None
    spectral: Any = None
    qk_clip: Any = None
    experiment_name: str = "default"
    tags: list[str] = field(default_factory=list)
    seed: int = 1337
    resume: ResumePolicy = ResumePolicy.auto
    extend_to: int | None = None


def null_for_attention(attention: str) -> str:
    """The spectral null that is exact at initialisation for an attention variant.

    MHA, GQA and KV shifting expose single Gaussian projections as factors, for which the
    `product` null (MP ⊠ MP, Monte-Carlo calibrated) is exact. MLA's content factors are
    compositions through the latent (W_DKV^T diag(g) W_UK^T), whose spectra are not MP: the
    product null flags ~all of them at step 0, the `rotation` null (each factor keeps its own
    spectrum; analysis/rotation.py) does not.
    """
    return "rotation" if AttentionConfig(name=AttentionName(attention)).is_mla else "product"


def register() -> None:
    """Register the schema and the `qk.run_id` and `qk.null_for` resolvers (idempotent)."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)
    if not OmegaConf.has_resolver("qk.run_id"):
        OmegaConf.register_new_resolver("qk.run_id", run_id_from_overrides)
    if not OmegaConf.has_resolver("qk.null_for"):
        OmegaConf.register_new_resolver("qk.null_for", null_for_attention)


def validate(cfg: DictConfig) -> None:
    """Run every group's cross-field checks and those of the loosely typed keys (trainer/run_checks.py);
    raise ConfigError naming the key and allowed values."""
    check_run(cfg, list(TrainSchema.__dataclass_fields__))
    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer)
    try:
        OmegaConf.to_object(cfg.model)
        OmegaConf.to_object(cfg.optim)
        OmegaConf.to_object(cfg.data)
    except ConfigError:
        raise
    except Exception as e:
        cause = e.__cause__ or e
        raise ConfigError(str(cause).splitlines()[0]) from e


register()
