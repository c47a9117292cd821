"""The LightningModule: next-token loss, AdamW with decoupled weight decay, warmup + cosine."""

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import measure_flops
from torch._dynamo.exc import TorchDynamoException
from torch._inductor.exc import InvalidCxxCompiler

from models import GPT, AttentionConfig, GPTConfig, LogitTerm, QKFactors

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # decoupled decay on matrices (not on norms/biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon

    def __post_init__(self) -> None:
        for key in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"optim.{key}={getattr(self, key)} is invalid: it must be a finite number")
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} is invalid: it must be > 0")
        if not self.eps > 0:
            raise ValueError(f"optim.eps={self.eps} is invalid: it must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} is invalid; allowed: 0 <= ratio <= 1")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps and optim.weight_decay must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key}={getattr(self, key)} is invalid; allowed: 0 <= beta < 1")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch's single-kernel AdamW runs: 4-5x faster steps than foreach on CPU


def adamw_with_schedule(
    parameters: Iterable[torch.nn.Parameter], c: OptimConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with decay on matrices only (norm gains, biases, KV-shift weights are 1-D: no decay),
    and the per-step warmup + cosine factor of `lr_factor` over `total_steps`; the fused kernel
    where the parameters' device has one."""
    params = [p for p in parameters if p.requires_grad]
    fused = params[0].device.type in FUSED_ADAMW_DEVICES
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, c.warmup_steps, total_steps, c.min_lr_ratio))
    return opt, sched


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """A dataclass dict with enums turned into their values (safe to store in a checkpoint)."""
    return {k: (_plain(v) if isinstance(v, dict) else getattr(v, "value", v)) for k, v in d.items()}


def next_token_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of a batch: what module.compile hands torch.compile (a function of the model,
    so the compiled wrapper is no submodule and the module's state_dict keeps its names)."""
    return model(x, y)[1]


class CompileError(RuntimeError):
    """torch.compile could not build the model's step (no C++ compiler, or an op it cannot trace)."""


COMPILE_ERRORS = (TorchDynamoException, InvalidCxxCompiler)


class LitGPT(L.LightningModule):
    def __init__(self, model: dict, optim: dict, sample_prompt: str = "", sample_tokens: int = 0,
                 compile: bool = False) -> None:
        super().__init__()
        model = dict(model)
        attention = AttentionConfig(**dict(model.pop("attention")))
        self.model_config = GPTConfig(**model, attention=attention)
        self.optim_config = OptimConfig(**dict(optim))
        self.save_hyperparameters({
            "model": _plain(asdict(self.model_config)),
            "optim": asdict(self.optim_config),
            "sample_prompt": sample_prompt,
            "sample_tokens": sample_tokens,
        }, logger=False)  # in the checkpoint only: the loggers get the whole resolved config once (train.py)
        self.model = GPT(self.model_config)
        # module.compile: the training and validation steps call the model through torch.compile (one
        # graph per variant, fullgraph); self.model itself stays the eager module, so checkpoints keep its
        # parameter names and generate(), the spectral probe and the tools run eagerly. A run-time choice,
        # not part of the model: left out of the checkpoint's hyper_parameters.
        self.compiled = compile
        if compile:  # a fresh compile cache: multirun jobs share a process, and dynamo falls back to eager
            torch._dynamo.reset()  # silently past its recompile limit (8 graphs per function)
        self._loss_of: Callable = torch.compile(next_token_loss, fullgraph=True) if compile else next_token_loss
        self._first_step_start: dict[str, float] = {}  # "train"/"val" -> start of its first (compiling) step
        self.sample_prompt, self.sample_tokens = sample_prompt, sample_tokens
        self.flops_per_batch: int | None = None
        self.tokens_seen = 0  # training tokens over all ranks, continued across resumes (the checkpoint has it)
        # one sequence, so the model summary counts the real FLOPs of a forward pass
        self.example_input_array = torch.zeros(1, self.model_config.block_size, dtype=torch.long)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def qk_factors(self) -> list[list[QKFactors]]:
        """The model's QK probe, for the spectral callback (which knows nothing else of the model)."""
        return self.model.qk_factors()

    def logit_terms(self) -> list[list[LogitTerm]]:
        """The parts of every head's attention logit, for the weight-only logit bound."""
        return self.model.logit_terms()

    def attention_scores(self, idx: torch.Tensor) -> Iterator[torch.Tensor]:
        """Per layer, the causal pre-softmax logits (B, H, T, T) of a probe batch idx (B, T)."""
        return self.model.attention_scores(idx)

    def activation_factors(self, idx: torch.Tensor) -> list[list[QKFactors]]:
        """The QK probe's activation form on a probe batch idx (B, T): every head's queries and keys."""
        return self.model.activation_factors(idx)

    def clip_qk_(self, eta: torch.Tensor) -> None:
        """Scale every head's logits by eta (L, H) <= 1 (QK-Clip)."""
        self.model.clip_qk_(eta)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global gradient norm before clipping (a baseline signal of training trouble)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def setup(self, stage: str) -> None:
        """Measure the FLOPs of one training batch on a meta-device copy (for ThroughputMonitor)."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if self.flops_per_batch is not None or dm is None:
            return
        with torch.device("meta"):
            meta_model = GPT(self.model_config)
            x = torch.randint(0, self.model_config.vocab_size, (dm.config.batch_size, dm.config.block_size))
        self.flops_per_batch = measure_flops(meta_model, lambda: meta_model(x, x)[1], loss_fn=torch.Tensor.sum)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of a batch, through the compiled forward when module.compile is set."""
        try:
            return self._loss_of(self.model, x, y)
        except COMPILE_ERRORS as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompileError(f"torch.compile failed for attention={self.model_config.attention.name.value} "
                               f"(fullgraph): {reason}. Train eagerly with module.compile=false") from e

    def _time_first_step(self, stage: str, end: bool) -> None:
        """Log once per stage how long the first compiled step took (compiling its graphs included)."""
        if not self.compiled or (stage in self._first_step_start) != end:
            return
        if not end:
            self._first_step_start[stage] = time.perf_counter()
        elif self._first_step_start[stage] > 0:
            seconds = time.perf_counter() - self._first_step_start[stage]
            self._first_step_start[stage] = 0.0
            log.info("torch.compile: first %s step %.1f s, compiling the attention=%s graph (fullgraph)",
                     "training" if stage == "train" else "validation", seconds,
                     self.model_config.attention.name.value)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._time_first_step("train", end=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._time_first_step("train", end=True)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._time_first_step("val", end=False)

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._time_first_step("val", end=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(x, y)
        self.tokens_seen += x.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen), on_step=True, on_epoch=False)  # an x-axis for W&B
        # the learning rate of this step (every parameter group has the same; one curve, not one per group)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = self._loss(x, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", torch.exp(loss), sync_dist=True)
        if self.sample_tokens > 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._log_sample()

    def _log_sample(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            log.warning("step %d: weights are not finite; no text sample", self.global_step)
            return
        tok = self.trainer.datamodule.tokenizer
        ids = tok.encode(self.sample_prompt).ids or [0]
        g = torch.Generator(device=self.device).manual_seed(0)
        idx = torch.tensor([ids], device=self.device)
        out = self.model.generate(idx, self.sample_tokens, temperature=0.8, top_k=50, generator=g)
        text = tok.decode(out[0].tolist())
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=["step", "text"], data=[[self.global_step, text]])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))

    def on_train_start(self) -> None:
        """Set every group's lr from the schedule at the step training starts from. A resumed run restores
        the lr the previous session set; when the run was extended (a longer trainer.max_steps, so a
        longer cosine) that value belongs to the old plan. Otherwise this sets the same value again."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                           scheduler.lr_lambdas, strict=True):
                group["lr"] = base * factor(scheduler.last_epoch)

    def configure_optimizers(self) -> dict:
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else 10**9
        opt, sched = adamw_with_schedule(self.parameters(), self.optim_config, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
