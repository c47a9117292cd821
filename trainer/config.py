"""Structured-config schemas (Hydra ConfigStore) and the validation run before any work.

Types and enum values are checked by OmegaConf when the config is composed or overridden;
cross-field rules (heads dividing the width, positive rates, ...) run in the dataclasses'
`__post_init__`, which `validate()` triggers by turning each group into objects.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from analysis.spectral.nulls import exact_null
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


# The nodes below hold types only: every value lives in conf/ (train.yaml and the group files), so a field is
# MISSING here and a group option that leaves one unset composes to `???` (tests/test_schema.py checks that
# none does). A field that takes more than one type (int or float, a name or a node) is `Any`; its values are
# checked where they are used (trainer/run_checks.py for `trainer.*`, the callbacks' constructors otherwise).


@dataclass
class PathsConfig:
    root: str = MISSING
    run_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class ModuleNode:
    """`module` (conf/train.yaml): the LightningModule, built by instantiate."""

    _target_: str = MISSING
    model: GPTConfig = MISSING  # ${model}
    optim: OptimConfig = MISSING  # ${optim}
    sample_prompt: str = MISSING
    sample_tokens: int = MISSING
    compile: bool = MISSING


@dataclass
class TrainerNode:
    """`trainer` (conf/trainer/): lightning.Trainer's arguments. Open: any other Trainer argument may be added
    (`+trainer.enable_progress_bar=false`, or in a YAML option); check_trainer refuses names Trainer does not
    take and the values it would reject."""

    _target_: str = MISSING
    accelerator: str = MISSING
    strategy: Any = MISSING  # a name (auto, ddp) or a node with _target_ (conf/trainer/fsdp.yaml)
    devices: Any = MISSING  # an integer, "auto", "0,1" or a list of indices
    num_nodes: int = MISSING
    precision: str = MISSING
    max_steps: int = MISSING
    val_check_interval: Any = MISSING  # an integer (batches) or a float (fraction of an epoch)
    check_val_every_n_epoch: int | None = MISSING
    limit_val_batches: Any = MISSING  # an integer (batches) or a float (fraction)
    num_sanity_val_steps: int = MISSING
    gradient_clip_val: float | None = MISSING
    accumulate_grad_batches: int = MISSING
    log_every_n_steps: int = MISSING
    use_distributed_sampler: bool = MISSING
    deterministic: Any = MISSING  # true, false or "warn"
    enable_model_summary: bool = MISSING
    default_root_dir: str = MISSING
    plugins: list[Any] | None = MISSING  # names or nodes with _target_


@dataclass
class BestCheckpointNode:
    _target_: str = MISSING
    dirpath: str | None = MISSING
    filename: str = MISSING
    monitor: str = MISSING
    mode: str = MISSING
    save_top_k: int = MISSING
    auto_insert_metric_name: bool = MISSING
    enable_version_counter: bool = MISSING


@dataclass
class LastCheckpointNode:
    _target_: str = MISSING
    dirpath: str | None = MISSING
    every_n_train_steps: int = MISSING
    save_top_k: int = MISSING
    save_last: Any = MISSING  # true, false or "link" (ModelCheckpoint)
    enable_version_counter: bool = MISSING


@dataclass
class ProgressNode:
    _target_: str = MISSING
    leave: bool = MISSING
    window: int = MISSING


@dataclass
class ThroughputNode:
    _target_: str = MISSING
    window_size: int = MISSING


@dataclass
class DivergenceNode:
    _target_: str = MISSING
    dirpath: str | None = MISSING
    check_grads: bool = MISSING


@dataclass
class WandbWatchNode:
    _target_: str = MISSING
    every_n_steps: int = MISSING


@dataclass
class CpuAllocatorNode:
    _target_: str = MISSING
    top_pad_mb: int = MISSING


@dataclass
class QKClipNode:
    """`qk_clip` (conf/qk_clip/on.yaml); null when off."""

    _target_: str = MISSING
    tau: float = MISSING
    every_n_steps: int = MISSING
    source: str = MISSING
    probe_batch_size: int = MISSING


@dataclass
class SpikesRule:
    level: str = MISSING
    k: int = MISSING
    K: int = MISSING
    cooldown: int = MISSING


@dataclass
class LayerLocalisedRule:
    level: str = MISSING
    factor: float = MISSING
    min_spikes: int = MISSING
    k: int = MISSING
    K: int = MISSING
    cooldown: int = MISSING


@dataclass
class RankCollapseRule:
    level: str = MISSING
    start_step: int = MISSING
    min_fraction: float = MISSING
    max_drop: float = MISSING
    window: int = MISSING
    k: int = MISSING
    K: int = MISSING
    cooldown: int = MISSING


@dataclass
class RunawayNormRule:
    level: str = MISSING
    start_step: int = MISSING
    growth: float = MISSING
    window: int = MISSING
    k: int = MISSING
    K: int = MISSING
    cooldown: int = MISSING


@dataclass
class NonFiniteRule:
    level: str = MISSING


@dataclass
class LogitGrowthRule:
    level: str = MISSING
    max_logit: float = MISSING
    bound: float = MISSING
    growth: float = MISSING
    window: int = MISSING
    floor: float = MISSING
    k: int = MISSING
    K: int = MISSING
    cooldown: int = MISSING


@dataclass
class SpectralRules:
    """`spectral.rules`: one node per alert rule (callbacks/spectral_rules.py); null keeps the rule's own
    settings. Keys the YAML does not set (`enabled`, a rule's `start_step`) are added with `+`."""

    spikes: SpikesRule | None = MISSING
    layer_localised: LayerLocalisedRule | None = MISSING
    rank_collapse: RankCollapseRule | None = MISSING
    runaway_norm: RunawayNormRule | None = MISSING
    non_finite: NonFiniteRule | None = MISSING
    logit_growth: LogitGrowthRule | None = MISSING


@dataclass
class SpectralNode:
    """`spectral` (conf/spectral/); null when off."""

    _target_: str = MISSING
    every_n_steps: int = MISSING
    null_model: str = MISSING
    fa_level: float = MISSING
    mc_draws: int = MISSING
    layer_sum_every_n_checks: int = MISSING
    bh_q: float = MISSING
    per_head: bool = MISSING
    histogram_bins: int = MISSING
    image_every_n_checks: int = MISSING
    run_dir: str | None = MISSING
    cache_dir: str | None = MISSING
    wait_duration: int = MISSING
    logit_every_n_steps: int = MISSING
    probe_batch_size: int = MISSING
    qk_clip_tau: float = MISSING
    activation_form: bool = MISSING
    rules: SpectralRules = MISSING
    actions: dict[str, list[str]] = MISSING  # level -> actions; the callback checks the names


@dataclass
class CallbacksNode:
    """`callbacks` (conf/callbacks/): each member is built from its _target_, null disables it; every option
    sets every member (callbacks/none.yaml: all null). Further callbacks are added with `+callbacks.NAME...`."""

    best_checkpoint: BestCheckpointNode | None = MISSING
    last_checkpoint: LastCheckpointNode | None = MISSING
    progress: ProgressNode | None = MISSING
    throughput: ThroughputNode | None = MISSING
    divergence: DivergenceNode | None = MISSING
    wandb_watch: WandbWatchNode | None = MISSING
    cpu_allocator: CpuAllocatorNode | None = MISSING
    qk_clip: QKClipNode | None = MISSING  # ${qk_clip}
    spectral: SpectralNode | None = MISSING  # ${spectral}


@dataclass
class TrainSchema:
    """Every top-level key of conf/train.yaml; unknown keys are errors."""

    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataNode = field(default_factory=DataNode)
    paths: PathsConfig = field(default_factory=PathsConfig)
    module: ModuleNode = MISSING
    trainer: TrainerNode = MISSING
    callbacks: CallbacksNode = MISSING
    # A logger is on when its entry is present (trainer/train.py builds every entry, and waits for W&B's run id
    # on other ranks when `wandb` is one), so the entries cannot be fixed fields that an option sets to null:
    # each is a node of its logger's arguments (conf/logger/), checked by the logger's own signature.
    logger: dict[str, dict[str, Any]] = MISSING
    spectral: SpectralNode | None = MISSING
    qk_clip: QKClipNode | None = MISSING
    experiment_name: str = MISSING
    tags: list[str] = MISSING
    seed: int = MISSING
    resume: ResumePolicy = MISSING
    extend_to: int | None = MISSING


def null_for_attention(attention: str) -> str:
    """`${qk.null_for:<attention>}`: the registry's exact null for the variant (analysis.spectral.nulls.exact_null);
    the MLA family's QK factors are composed through the latent."""
    return exact_null(AttentionConfig(name=AttentionName(attention)).is_mla)


def register() -> None:
    """Register the schema and the `qk.run_id` and `qk.null_for` resolvers (idempotent)."""
    schema = OmegaConf.structured(TrainSchema)
    schema._get_node("trainer")._set_flag("struct", False)  # open: check_trainer judges the keys (TrainerNode)
    ConfigStore.instance().store(name="train_schema", node=schema)
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
