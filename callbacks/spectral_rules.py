"""Alert rules of the spectral health callback.

Each rule looks at one check, plus the rule's own memory of earlier checks, and says which keys
(a head, a layer) exceed its threshold now. A rule's `source` says which check it reads: a
spectral check (`SpectralReport`, every `every_n_steps`) or a logit check (`LogitStats`, every
`logit_every_n_steps`). The
`Persistence` tracker turns exceedances into alerts: a key fires when it exceeded in k of the
last K checks, and not again until `cooldown` checks have passed. All state is plain lists and
dicts, so it round-trips through a Lightning checkpoint.
"""

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from analysis.spectral import SpectralReport
from analysis.spectral.logits import LogitStats

LEVELS = ("INFO", "WARN", "ERROR")


@dataclass
class Exceedance:
    key: str  # e.g. "L3H1" (a head) or "L3" (a layer) or "model"
    detail: str  # what was measured, for the alert text
    severity: float = 0.0  # how far past the rule's threshold (larger is worse), to rank keys in the console line


@dataclass
class Alert:
    rule: str
    level: str
    title: str
    text: str  # every exceedance's detail (alerts.jsonl, wandb.alert)
    step: int
    keys: list[str]
    worst: list[str] = field(default_factory=list)  # the keys by severity, worst first

    def summary(self, n: int = 3) -> str:
        """The console line: level, rule, step, how many keys, the worst `n` of them."""
        worst = self.worst or self.keys
        more = f" +{len(worst) - n} more" if len(worst) > n else ""
        return (f"[spectral {self.level}] {self.rule} at step {self.step}: {len(self.keys)} "
                f"{'key' if len(self.keys) == 1 else 'keys'} ({', '.join(worst[:n])}{more}); details in alerts.jsonl")


def _values_window_ago(memory: dict, kind: str, values: list[float], window: int) -> list[float] | None:
    """The per-layer values of `window` checks ago (None until that many were seen); remembers `values`."""
    past = memory.setdefault(kind, [])
    oldest = past[0] if len(past) >= window else None
    past.append(values)
    del past[:-window]
    return oldest


def _head_keys(mask: torch.Tensor) -> list[str]:
    return [f"L{int(layer)}H{int(head)}" for layer, head in mask.nonzero().tolist()]


@dataclass
class SpikeRule:
    """Heads whose λ_max exceeds the null at the Bonferroni-corrected level α / (L·H)."""

    level: str = "INFO"
    fa_level: float = 0.01

    source = "spectral"
    name = "spikes"
    persistence = (2, 3, 1000)  # k of the last K checks; cooldown in checks
    start_step = 0  # evaluated from this optimizer step
    title = "Spectral spike beyond the random-matrix null"

    def exceedances(self, report: SpectralReport, memory: dict) -> list[Exceedance]:
        out = []
        for kind, hs in report.heads.items():
            m = hs.pvalue.numel()
            flagged = (hs.pvalue < self.fa_level / m) & hs.finite
            for layer, head in flagged.nonzero().tolist():
                ratio = float(hs.lambda_max[layer, head] / hs.edge[layer, head])
                p = float(hs.pvalue[layer, head])
                out.append(Exceedance(f"{kind}:L{layer}H{head}", (
                    f"{kind} L{layer}H{head}: λ_max/edge={ratio:.2f}, "
                    f"spikes={int(hs.num_spikes[layer, head])}, p={p:.2g} "
                    f"(Bonferroni level {self.fa_level / m:.2g})"
                ), -math.log10(max(p, 1e-300))))
        return out


@dataclass
class LayerLocalisedRule:
    """A layer whose spike count is far above the median of the other layers (seed 000's pattern)."""

    level: str = "INFO"
    factor: float = 3.0  # spikes(layer) > factor * median(other layers) ...
    min_spikes: int = 2  # ... and at least this many

    source = "spectral"
    name = "layer_localised"
    persistence = (2, 3, 10)  # k of the last K checks; cooldown in checks
    start_step = 0  # evaluated from this optimizer step
    title = "Layer-localised spectral anomaly"

    def exceedances(self, report: SpectralReport, memory: dict) -> list[Exceedance]:
        out = []
        for kind, hs in report.heads.items():
            per_layer = torch.where(hs.finite, hs.num_spikes, 0).sum(dim=1).float()  # (L,)
            if per_layer.numel() < 2:
                continue
            for layer in range(per_layer.numel()):
                others = torch.cat([per_layer[:layer], per_layer[layer + 1 :]])
                median = float(others.median())
                count = float(per_layer[layer])
                if count >= self.min_spikes and count > self.factor * median:
                    out.append(Exceedance(f"{kind}:L{layer}", (
                        f"{kind} layer {layer}: {int(count)} spikes vs median {median:g} in the other layers"
                    ), count - median))
        return out


@dataclass
class RankCollapseRule:
    """Effective rank below a fraction of r, or fallen fast since `window` checks ago (per layer mean)."""

    level: str = "INFO"
    min_fraction: float = 0.2  # eff_rank / r below this is collapse
    max_drop: float = 0.5  # or a fall by more than this fraction ...
    window: int = 5  # ... over this many checks

    source = "spectral"
    name = "rank_collapse"
    persistence = (2, 3, 10)  # k of the last K checks; cooldown in checks
    start_step = 0  # evaluated from this optimizer step
    title = "Rank collapse in attention heads"

    def exceedances(self, report: SpectralReport, memory: dict) -> list[Exceedance]:
        out = []
        for kind, hs in report.heads.items():
            r = hs.eigs.shape[-1]
            eff = torch.where(hs.finite, hs.eff_rank, torch.nan).nanmean(dim=1)  # (L,)
            before = _values_window_ago(memory, kind, eff.tolist(), self.window)
            for layer, value in enumerate(eff.tolist()):
                old = before[layer] if before is not None else None
                if value < self.min_fraction * r:
                    detail = f"{kind} layer {layer}: effective rank {value:.1f} of {r}"
                    out.append(Exceedance(f"{kind}:L{layer}", detail, 1 - value / r))
                elif old is not None and value < (1 - self.max_drop) * old:
                    out.append(Exceedance(f"{kind}:L{layer}", (
                        f"{kind} layer {layer}: effective rank fell {old:.1f} -> {value:.1f} in {self.window} checks"
                    ), 1 - value / old))
        return out


@dataclass
class RunawayNormRule:
    """Spectral norm of a layer's heads growing by more than `growth` x over `window` checks."""

    level: str = "INFO"
    growth: float = 4.0
    window: int = 3

    source = "spectral"
    name = "runaway_norm"
    persistence = (1, 1, 10)  # k of the last K checks; cooldown in checks
    start_step = 200  # evaluated from this optimizer step
    title = "Runaway spectral norm of W_Q W_K^T"

    def exceedances(self, report: SpectralReport, memory: dict) -> list[Exceedance]:
        out = []
        for kind, hs in report.heads.items():
            norm = torch.where(hs.finite, hs.spectral_norm, torch.nan).amax(dim=1)  # (L,)
            before = _values_window_ago(memory, kind, norm.tolist(), self.window)
            for layer, (old, new) in enumerate(zip(before or [], norm.tolist(), strict=False)):
                if old > 0 and new > self.growth * old:
                    out.append(Exceedance(f"{kind}:L{layer}", (
                        f"{kind} layer {layer}: max spectral norm {old:.3g} -> {new:.3g} in {self.window} checks"
                    ), new / old))
        return out


@dataclass
class NonFiniteRule:
    """Any head whose factors hold NaN or Inf: an ERROR at once, never a crash."""

    level: str = "ERROR"

    source = "spectral"
    name = "non_finite"
    persistence = (1, 1, 0)  # k of the last K checks; cooldown in checks
    start_step = 0  # evaluated from this optimizer step
    title = "Non-finite attention weights"

    def exceedances(self, report: SpectralReport, memory: dict) -> list[Exceedance]:
        out = []
        for kind, hs in report.heads.items():
            bad = _head_keys(~hs.finite)
            if bad:
                out.append(Exceedance("model", f"{kind}: non-finite factors in {', '.join(bad)}", float(len(bad))))
        return out


@dataclass
class LogitGrowthRule:
    """A layer whose attention logits grow toward a one-hot softmax (Wortsman et al. 2023, arXiv 2309.14322).

    Per layer (max over heads): the measured max logit on the probe batch above `max_logit`, or
    the weight-only bound above `bound`, or the bound grown by more than `growth` x over `window`
    logit checks while above `floor`.
    """

    level: str = "WARN"
    max_logit: float = 50.0
    bound: float = 1000.0
    growth: float = 8.0
    window: int = 3
    floor: float = 100.0

    name = "logit_growth"
    persistence = (1, 1, 30)  # k of the last K checks; cooldown in checks
    start_step = 0  # evaluated from this optimizer step
    title = "Attention logit growth"
    source = "logits"

    def exceedances(self, stats: LogitStats, memory: dict) -> list[Exceedance]:
        out = []
        logit = stats.max_logit.nan_to_num(float("inf")).amax(dim=1)  # (L,)
        bound = stats.bound.nan_to_num(float("inf")).amax(dim=1)  # (L,)
        before = _values_window_ago(memory, "bound", bound.tolist(), self.window)
        for layer, (s, b) in enumerate(zip(logit.tolist(), bound.tolist(), strict=True)):
            old = before[layer] if before is not None else None
            why = []
            if s > self.max_logit:
                why.append(f"max logit {s:.3g} > {self.max_logit:g}")
            if b > self.bound:
                why.append(f"logit bound {b:.3g} > {self.bound:g}")
            if old is not None and b > self.floor and b > self.growth * old:
                why.append(f"bound grew {old:.3g} -> {b:.3g} in {self.window} checks")
            if why:
                out.append(Exceedance(f"L{layer}", f"layer {layer}: " + ", ".join(why), max(s / self.max_logit,
                                                                                                b / self.bound)))
        return out


@dataclass
class Persistence:
    """k-of-K persistence and per-key cool-down for one rule; plain-data state."""

    k: int = 2
    K: int = 3
    cooldown: int = 10  # checks before the same key may fire again
    windows: dict[str, list[bool]] = field(default_factory=dict)
    last_fired: dict[str, int] = field(default_factory=dict)

    def update(self, check: int, exceeded: set[str]) -> set[str]:
        """Record this check's exceedances; return the keys that fire now."""
        fire = set()
        for key in set(self.windows) | exceeded:
            window = deque(self.windows.get(key, []), maxlen=self.K)
            window.append(key in exceeded)
            self.windows[key] = list(window)
            cooled = check - self.last_fired.get(key, -(10**9)) > self.cooldown
            if key in exceeded and sum(window) >= self.k and cooled:
                fire.add(key)
                self.last_fired[key] = check
        return fire

    def state_dict(self) -> dict:
        return {"windows": self.windows, "last_fired": self.last_fired}

    def load_state_dict(self, state: dict) -> None:
        self.windows = {k: list(v) for k, v in state["windows"].items()}
        self.last_fired = dict(state["last_fired"])


RULES = {cls.name: cls for cls in (SpikeRule, LayerLocalisedRule, RankCollapseRule, RunawayNormRule, NonFiniteRule,
                                   LogitGrowthRule)}


ACTIONS = ("log", "checkpoint", "stop", "qk_clip")  # what an alert of a level may trigger


def build_rules(config: dict[str, dict[str, Any]], fa_level: float) -> tuple[dict, dict, dict]:
    """Rules, their persistence trackers and the step from which each is evaluated (`start_step`)."""
    rules, persistence, start_steps = {}, {}, {}
    merged = {name: {} for name in RULES} | {name: dict(params or {}) for name, params in dict(config).items()}
    for name, params in merged.items():
        if name not in RULES:
            raise ValueError(f"spectral.rules.{name} is not a rule; allowed: {sorted(RULES)}")
        params = dict(params)
        if params.pop("enabled", True) is False:
            continue
        start_steps[name] = int(params.pop("start_step", RULES[name].start_step))
        window = dict(zip(("k", "K", "cooldown"), RULES[name].persistence, strict=True))
        window |= {key: params.pop(key) for key in ("k", "K", "cooldown") if key in params}
        if name == "spikes":
            params.setdefault("fa_level", fa_level)
        rule = RULES[name](**params)
        if rule.level not in LEVELS:
            raise ValueError(f"spectral.rules.{name}.level={rule.level!r}; allowed: {list(LEVELS)}")
        rules[name], persistence[name] = rule, Persistence(**window)
    return rules, persistence, start_steps

def check_actions(actions: dict[str, list[str]]) -> dict[str, list[str]]:
    """`spectral.actions`: per level, the actions it triggers, each one of ACTIONS."""
    out = {}
    for level, acts in dict(actions).items():
        if level not in LEVELS:
            raise ValueError(f"spectral.actions.{level} is not a level; allowed: {list(LEVELS)}")
        bad = [a for a in acts if a not in ACTIONS]
        if bad:
            raise ValueError(f"spectral.actions.{level}={bad} is invalid; allowed: {list(ACTIONS)}")
        out[level] = list(acts)
    return out
