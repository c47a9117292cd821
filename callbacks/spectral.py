"""The spectral health callback: every N optimizer steps, each head's W_Q W_K^T against a null.

Rank 0 reads the model's QK probe (`pl_module.qk_factors()`, nothing else about the model),
hands it to `analysis.SpectralAnalyzer`, evaluates the alert rules, and logs: scalars through
the Lightning loggers at `trainer/global_step`, ESD histograms, an image every M checks, a
table of per-head metrics, `alerts.jsonl` and the spectral history under `<run_dir>/spectra/`.
Alerts go to `wandb.alert` as well. Actions per level: log, checkpoint, stop, qk_clip.

Every `logit_every_n_steps` (a cheaper check, also at every spectral check) it measures every
head's attention logits on a fixed held-out probe batch (max |logit|, entropy) beside their
weight-only bound from the model's `logit_terms()`, logs them as `logits/...`, appends them to
`<run_dir>/logits.jsonl` and evaluates the rules whose source is "logits" (`logit_growth`). The
`qk_clip` action arms QK-Clip: from the first alert of a level carrying it, every logit check
scales the heads whose measured max logit exceeds `qk_clip_tau` back to it.

With `activation_form`, every spectral check also analyses each head's activation form, Q_h K_hᵀ of
the probe batch (`pl_module.activation_factors`), against the same null; it is logged and written as
the kind "activation" beside the weight form's kinds and is not evaluated by the alert rules.
"""

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy

from analysis.spectral import NULL_NAMES, HeadSpectra, SpectralAnalyzer, SpectralReport
from analysis.spectral.history import ALERTS_FILE, LOGITS_FILE, SPECTRA_DIR, append_logit_check, write_report
from analysis.spectral.logits import LogitStats, clip_factors
from callbacks.logit_probe import activation_factors, measure_logits, probe_batch
from callbacks.spectral_logging import logit_scalars, probe_meta, report_scalars, wandb_payload
from callbacks.spectral_rules import Alert, build_rules, check_actions

log = logging.getLogger(__name__)

def full_parameters(trainer: L.Trainer) -> contextlib.AbstractContextManager:
    """The unsharded weights for the duration of a `with` block, where a strategy shards them.

    Under FSDP each rank holds a flat shard of every parameter; `summon_full_params` gathers
    them (a collective: every rank must enter it), on rank 0 only (`rank0_only`), read-only.
    DDP and single-device runs hold whole weights already.
    """
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True)
    return contextlib.nullcontext()


class SpectralHealthCallback(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 50,
        null_model: str = "product",
        fa_level: float = 0.01,
        mc_draws: int = 2000,
        bh_q: float = 0.05,
        layer_sum_every_n_checks: int = 10,
        rules: dict[str, dict[str, Any]] | None = None,
        actions: dict[str, list[str]] | None = None,
        per_head: bool = False,
        histogram_bins: int = 64,
        image_every_n_checks: int = 10,
        run_dir: str | None = None,
        cache_dir: str | None = None,
        wait_duration: int = 300,
        logit_every_n_steps: int = 10,
        probe_batch_size: int = 4,
        qk_clip_tau: float = 100.0,
        activation_form: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("every_n_steps", every_n_steps), ("logit_every_n_steps", logit_every_n_steps),
                           ("probe_batch_size", probe_batch_size), ("qk_clip_tau", qk_clip_tau)):
            if not value > 0:
                raise ValueError(f"spectral.{key}={value} is invalid: it must be > 0")
        if not 0 < fa_level < 1:
            raise ValueError(f"spectral.fa_level={fa_level} is invalid; allowed: 0 < fa_level < 1")
        if null_model not in NULL_NAMES:
            raise ValueError(f"spectral.null_model={null_model!r} is invalid; allowed: {list(NULL_NAMES)}")
        self.every_n_steps, self.logit_every_n_steps = every_n_steps, logit_every_n_steps
        self.probe_batch_size, self.qk_clip_tau = probe_batch_size, qk_clip_tau
        self.activation_form = activation_form
        self.analyzer = SpectralAnalyzer(null=null_model, fa_level=fa_level, mc_draws=mc_draws, cache_dir=cache_dir)
        self.bh_q = bh_q
        self.layer_sum_every_n_checks = layer_sum_every_n_checks
        if histogram_bins < 1:
            raise ValueError(f"spectral.histogram_bins={histogram_bins} is invalid; allowed: >= 1")
        self.per_head, self.histogram_bins = per_head, min(histogram_bins, 512)
        self.image_every_n_checks, self.wait_duration = image_every_n_checks, wait_duration
        self.run_dir = Path(run_dir) if run_dir else None
        self.rules, self.persistence, self.start_steps = build_rules(rules or {}, fa_level)
        default_actions = {"INFO": ["log"], "WARN": ["log"], "ERROR": ["log", "checkpoint", "stop"]}
        self.actions = check_actions(actions or default_actions)
        self.checks = 0
        self.logit_checks = 0
        self.clip_armed = False
        self.stop_reason: str | None = None  # why this callback stopped training, for the entry point's exit message
        self.last_step = -1
        self.rule_memory: dict[str, dict] = {name: {} for name in self.rules}
        self.previous: SpectralReport | None = None
        self.seconds_total = 0.0

    # ----------------------------------------------------------------- scheduling
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy) and any("qk_clip" in a for a in self.actions.values()):
            raise ValueError("spectral.actions with qk_clip need whole weights on every rank; "
                             "not available under FSDP (the weights are sharded)")
        self.probe = probe_batch(trainer, pl_module, self.probe_batch_size)
        if trainer.global_step == 0:
            self._check(trainer, pl_module, spectral=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.last_step:  # accumulation: several batches end at one optimizer step
            return
        spectral = step % self.every_n_steps == 0
        if spectral or step % self.logit_every_n_steps == 0:
            self._check(trainer, pl_module, spectral=spectral)

    # ----------------------------------------------------------------- one check
    @torch.no_grad()
    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, spectral: bool) -> None:
        """A logit check, and a spectral check too when `spectral`; then the fired alerts' actions."""
        step = trainer.global_step
        self.last_step = step
        fired: list[Alert] = []
        stats: LogitStats | None = None
        with full_parameters(trainer):  # FSDP: every rank joins the gather; rank 0 reads whole weights
            if trainer.is_global_zero:
                stats, fired = self._logit_check(trainer, pl_module, step)
                if spectral:
                    fired += self._spectral_check(trainer, pl_module, step)
        if trainer.is_global_zero:
            for alert in fired:
                self._emit(trainer, alert)
        levels = {a.level for a in fired}
        todo = sorted({act for level in levels for act in self.actions.get(level, ["log"])})
        todo = trainer.strategy.broadcast(todo, src=0)
        if "checkpoint" in todo and self.run_dir is not None:
            trainer.save_checkpoint(self.run_dir / "checkpoints" / f"alert-step{step:07d}.ckpt", weights_only=False)
        if "stop" in todo:
            trainer.should_stop = True
            names = sorted({a.rule for a in fired}) or ["an alert on rank 0"]
            self.stop_reason = f"the spectral callback's 'stop' action at step {step} ({', '.join(names)})"
            log.error("spectral health: stopping training at step %d (alert action 'stop')", step)
        if "qk_clip" in todo and not self.clip_armed:
            self.clip_armed = True
            log.warning("spectral health: QK-Clip armed at step %d (tau=%g)", step, self.qk_clip_tau)
        if self.clip_armed:
            eta = clip_factors(stats.max_logit, self.qk_clip_tau) if stats is not None else None
            eta = trainer.strategy.broadcast(eta, src=0)
            if eta is not None and bool((eta < 1).any()):
                pl_module.clip_qk_(eta)
                log.info("step %d: QK-Clip scaled %d heads to max logit %g", step, int((eta < 1).sum()),
                         self.qk_clip_tau)

    def _logit_check(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     step: int) -> tuple[LogitStats | None, list[Alert]]:
        try:
            stats = measure_logits(pl_module, self.probe)
        except Exception as e:  # a failed measurement is an alert, not a crash
            log.exception("logit check at step %d failed", step)
            return None, [Alert("analysis_error", "ERROR", "qkscope: logit check failed",
                                f"step {step}: {type(e).__name__}: {e}", step, ["model"])]
        fired = self._evaluate("logits", stats, step, self.logit_checks)
        self.logit_checks += 1
        for logger in trainer.loggers:
            logger.log_metrics(logit_scalars(stats), step=step)
        self._write_logits(stats, step)
        return stats, fired

    def _spectral_check(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> list[Alert]:
        start = time.perf_counter()
        try:
            factors = pl_module.qk_factors()
            every = self.layer_sum_every_n_checks
            layer_sum = every > 0 and self.checks % every == 0
            report = self.analyzer.analyze(factors, previous=self.previous, layer_sum=layer_sum)
            fired = self._evaluate("spectral", report, step, self.checks)
            if self.activation_form:
                report = self._with_activation_form(pl_module, report)
            self.previous = report
            self.checks += 1
            self._log(trainer, report, probe_meta(factors), step)
            if self.run_dir is not None:
                write_report(self.run_dir / SPECTRA_DIR, step, report)
        except Exception as e:  # a failed analysis (an SVD that did not converge, ...) is an alert, not a crash
            log.exception("spectral check at step %d failed", step)
            fired = [Alert("analysis_error", "ERROR", "qkscope: spectral analysis failed",
                           f"step {step}: {type(e).__name__}: {e}", step, ["model"])]
        self.seconds_total += time.perf_counter() - start
        return fired

    def _with_activation_form(self, pl_module: L.LightningModule, report: SpectralReport) -> SpectralReport:
        """The weight report with the activation form's heads (kind "activation": every head's Q K^T on the
        probe batch, against the same null) added, to be logged and written with it; the alert rules have
        seen the weight form only (their levels were set on it)."""
        act = self.analyzer.analyze(activation_factors(pl_module, self.probe), previous=self.previous,
                                    layer_sum=False)
        return dataclasses.replace(report, heads={**report.heads, **act.heads},
                                   factors={**report.factors, **act.factors}, seconds=report.seconds + act.seconds,
                                   calibration_seconds=report.calibration_seconds + act.calibration_seconds)

    def _evaluate(self, source: str, data: SpectralReport | LogitStats, step: int, check: int) -> list[Alert]:
        alerts = []
        for name, rule in self.rules.items():
            if rule.source != source or step < self.start_steps[name]:  # e.g. ranks move fast in warmup
                continue
            found = rule.exceedances(data, self.rule_memory[name])
            details = {e.key: e.detail for e in found}
            severity = {e.key: e.severity for e in found}
            fire = self.persistence[name].update(check, set(details))
            if fire:
                keys = sorted(fire)
                text = f"step {step}: " + "; ".join(details[k] for k in keys)
                worst = sorted(keys, key=lambda k: -severity[k])
                alerts.append(Alert(name, rule.level, f"qkscope: {rule.title}", text, step, keys, worst))
        return alerts

    def _write_logits(self, stats: LogitStats, step: int) -> None:
        if self.run_dir is None:
            return
        append_logit_check(self.run_dir / LOGITS_FILE, step,
                           {name: getattr(stats, name).tolist() for name in ("max_logit", "bound", "entropy")})

    # ----------------------------------------------------------------- sinks
    def _emit(self, trainer: L.Trainer, alert: Alert) -> None:
        log.log(logging.getLevelName(alert.level.replace("WARN", "WARNING")), "%s", alert.summary())
        for logger in trainer.loggers:  # a marker at the alert's step, to overlay on the loss chart
            logger.log_metrics({f"alerts/{alert.level}": 1.0}, step=alert.step)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / ALERTS_FILE, "a") as f:
                f.write(json.dumps({**asdict(alert), "time": time.time()}) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                try:
                    logger.experiment.alert(title=alert.title, text=alert.text,
                                            level=getattr(wandb.AlertLevel, alert.level),
                                            wait_duration=self.wait_duration)
                except Exception as e:  # a W&B failure must not stop training
                    log.warning("wandb.alert failed: %s", e)

    def _log(self, trainer: L.Trainer, report: SpectralReport, meta: dict[str, float], step: int) -> None:
        scalars = report_scalars(report, meta, self.checks, self.bh_q, self.per_head)
        final = 0 < trainer.max_steps <= step  # the last check of a run always has its images (-1: no limit)
        images = bool(self.image_every_n_checks) and ((self.checks - 1) % self.image_every_n_checks == 0 or final)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, WandbLogger):
                logger.experiment.log(wandb_payload(report, step, self.analyzer, self.histogram_bins, images))

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "logit_checks": self.logit_checks,
            "clip_armed": self.clip_armed,
            "last_step": self.last_step,
            "rule_memory": self.rule_memory,
            "persistence": {name: p.state_dict() for name, p in self.persistence.items()},
            "previous": {kind: asdict(hs) for kind, hs in self.previous.heads.items()} if self.previous else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.checks, self.last_step = state["checks"], state["last_step"]
        self.logit_checks = state.get("logit_checks", 0)
        self.clip_armed = state.get("clip_armed", False)
        self.rule_memory = {name: state["rule_memory"].get(name, {}) for name in self.rules}
        for name, p in self.persistence.items():
            if name in state["persistence"]:
                p.load_state_dict(state["persistence"][name])
        if state.get("previous") is not None:  # the last check's heads, for the overlap metric
            heads = {kind: HeadSpectra(**fields) for kind, fields in state["previous"].items()}
            self.previous = SpectralReport(heads=heads, factors={}, layer_sum=torch.empty(0), seconds=0.0)
