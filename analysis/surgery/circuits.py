"""K-MSHC: minimal sufficient head circuits (Chowdhary, Chin & Chakrabarty 2025; docs/methods.md §9).

Notation. M is the set of all heads (l, h); S(X) is the task score (analysis/surgery/tasks.py: mean
logit difference or accuracy on minimal pairs) with exactly the heads in X active and every
other head ablated at its output before W_O (models/head_gate.py: mean or zero ablation).

Our reading where the method's description is open (docs/methods.md §9):
- B, the "baseline" context, is the fully ablated model (no head active), and
  U_ε(M, B) = S(B) + ε·(S(M) − S(B)) is the ε-interpolation between it and the full model.
  A set H is sufficient when S(H) ≥ U_ε with everything outside H ablated.
- (K, ε)-MSHC: H is sufficient and no K-subset can be removed from it while staying
  sufficient (K-minimality; K = 1 is ordinary minimality, a larger K certifies less at a lower
  cost); the complement alone is insignificant, S(M ∖ H) far below S(M) (reported, not imposed).
- Phase 1 (macro): a window of W adjacent layers slides over the model; for each position
  drop = S(M) − S(M ∖ H_W), and every layer in the window keeps DROP[ℓ] = min(DROP[ℓ], drop)
  (a layer counts only if every window holding it matters). The candidate set C is every
  head of the layers with DROP[ℓ] at or above the p-th percentile of DROP; if C is not
  sufficient, C falls back to all heads (recorded).
- Phase 2 (micro): k = ⌊|C|/2⌋; sample N random k-subsets Θ_i of C and score the remainders
  S(C ∖ Θ_i). The summary's "take the worst Θ, prune if below U_ε" reads backwards; we take
  the *most removable* subset, Θ* = argmax_i S(C ∖ Θ_i), and remove it if S(C ∖ Θ*) ≥ U_ε
  (then k ← min(k, ⌊|C|/2⌋)), else halve k, k ← max(K, ⌊k/2⌋). At k = K every K-subset is
  tried when there are at most `exhaustive_limit` of them, which certifies K-minimality;
  otherwise the stop is stochastic (the paper's bound on undetected prunable sets applies).
  The search stops when a step at k = K removes nothing.

Reported per task: the circuit, S(H), S(M ∖ H), recovered fraction (S(H) − S(B))/(S(M) − S(B)),
each head's removal impact from the full model, (S(M) − S(M ∖ {h}))/(S(M) − S(B)) ("strong"
heads at or above `strong_threshold`, "weak" below), and across tasks the Jaccard overlap of
circuits, its impact-weighted form Σ min(w_a, w_b)/Σ max(w_a, w_b), and shared strong/weak heads.
"""

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from analysis.surgery.tasks import EncodedPairs, task_score
from models.head_gate import head_gates, head_output_means, head_shape

Head = tuple[int, int]


@dataclass
class CircuitConfig:
    """Search-K-MSHC settings (docs/methods.md §9)."""

    K: int = 1  # minimality granularity: no K-subset of the circuit is removable
    eps: float = 0.8  # sufficiency threshold as a fraction of the full-vs-ablated score gap
    window: int = 1  # W, adjacent layers per macro window
    percentile: float = 50.0  # p: candidate layers have DROP at or above this percentile
    n_samples: int = 16  # N random k-subsets per micro step
    exhaustive_limit: int = 256  # try every K-subset at k = K when there are at most this many
    ablation: Literal["mean", "zero"] = "mean"
    metric: Literal["logit_diff", "acc"] = "logit_diff"
    strong_threshold: float = 0.1  # strong head: full-model removal costs >= this fraction of the gap
    seed: int = 0

    def __post_init__(self) -> None:
        if self.K < 1 or self.window < 1 or self.n_samples < 1:
            raise ValueError("search.K, search.window and search.n_samples must be >= 1")
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"search.eps={self.eps} is invalid; allowed: 0 < eps <= 1")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"search.percentile={self.percentile} is invalid; allowed: 0..100")
        if self.ablation not in ("mean", "zero"):
            raise ValueError(f"search.ablation={self.ablation!r} is invalid; allowed: ['mean', 'zero']")
        if self.metric not in ("logit_diff", "acc"):
            raise ValueError(f"search.metric={self.metric!r} is invalid; allowed: ['logit_diff', 'acc']")


class SetScorer:
    """S(X) for any set function `score` over the heads of an (L, H) model; memoised, counts evaluations.

    The search below only ever calls S on head sets, so it can be checked on a planted score.
    """

    def __init__(self, L: int, H: int, score: Callable[[frozenset[Head]], float]) -> None:
        self.L, self.H, self._score = L, H, score
        self._memo: dict[frozenset[Head], float] = {}

    @property
    def all_heads(self) -> frozenset[Head]:
        return frozenset(itertools.product(range(self.L), range(self.H)))

    @property
    def evaluations(self) -> int:
        return len(self._memo)

    def __call__(self, active: frozenset[Head] | set[Head]) -> float:
        key = frozenset(active)
        if key not in self._memo:
            self._memo[key] = self._score(key)
        return self._memo[key]


def head_mask(active: frozenset[Head], L: int, H: int) -> torch.Tensor:
    """(L, H) gate mask: 1 for the active heads, 0 for the ablated ones."""
    m = torch.zeros(L, H)  # (L, H)
    for layer, head in active:
        m[layer, head] = 1.0
    return m


def model_scorer(model: nn.Module, data: EncodedPairs, cfg: CircuitConfig) -> SetScorer:
    """S(X) = task score of `model` on `data` with the heads outside X ablated (cfg.ablation, cfg.metric);
    mean ablation uses each head's mean output over the task's own (non-pad) tokens."""
    model.eval()
    L, H, _ = head_shape(model)
    means = head_output_means(model, data.idx, data.valid) if cfg.ablation == "mean" else None

    def score(active: frozenset[Head]) -> float:
        with head_gates(model, head_mask(active, L, H), cfg.ablation, means):
            return task_score(model, data, cfg.metric)

    return SetScorer(L, H, score)


@dataclass
class Circuit:
    """The result of Search-K-MSHC on one task."""

    task: str
    heads: list[Head]
    score_full: float
    score_ablated: float
    threshold: float
    score_circuit: float
    score_complement: float
    layer_drop: list[float]
    candidate_layers: list[int]
    phase1_fallback: bool
    certified_minimal: bool
    impact: list[list[float]]  # (L, H) full-model removal impact, in units of the gap
    strong: list[Head] = field(default_factory=list)
    weak: list[Head] = field(default_factory=list)
    evaluations: int = 0
    steps: list[dict] = field(default_factory=list)

    @property
    def gap(self) -> float:
        return self.score_full - self.score_ablated

    @property
    def recovered(self) -> float:
        """(S(H) − S(B)) / (S(M) − S(B)): the fraction of the task score the circuit alone restores."""
        return (self.score_circuit - self.score_ablated) / self.gap if self.gap else float("nan")

    @property
    def removal_drop(self) -> float:
        """(S(M) − S(M ∖ H)) / (S(M) − S(B)): the fraction lost when the circuit alone is ablated."""
        return (self.score_full - self.score_complement) / self.gap if self.gap else float("nan")

    def summary(self) -> dict:
        return {"task": self.task, "size": len(self.heads), "heads": [list(h) for h in self.heads],
                "score_full": self.score_full, "score_ablated": self.score_ablated, "threshold": self.threshold,
                "score_circuit": self.score_circuit, "score_complement": self.score_complement,
                "recovered": self.recovered, "removal_drop": self.removal_drop,
                "candidate_layers": self.candidate_layers, "layer_drop": self.layer_drop,
                "phase1_fallback": self.phase1_fallback, "certified_minimal": self.certified_minimal,
                "strong": [list(h) for h in self.strong], "weak": [list(h) for h in self.weak],
                "impact": self.impact, "evaluations": self.evaluations, "steps": self.steps}


def layer_heads(layers: Sequence[int], H: int) -> frozenset[Head]:
    return frozenset((layer, h) for layer in layers for h in range(H))


def macro_search(S: SetScorer, cfg: CircuitConfig) -> tuple[list[float], list[int]]:
    """Phase 1: DROP[ℓ] = min over windows holding ℓ of S(M) − S(M ∖ H_W); candidates >= p-th percentile."""
    L, W = S.L, min(cfg.window, S.L)
    full = S(S.all_heads)
    drop = [math.inf] * L
    for start in range(L - W + 1):
        window = range(start, start + W)
        d = full - S(S.all_heads - layer_heads(window, S.H))
        for layer in window:
            drop[layer] = min(drop[layer], d)
    cut = float(np.percentile(drop, cfg.percentile))
    return drop, [layer for layer in range(L) if drop[layer] >= cut]


def _subsets(C: list[Head], k: int, cfg: CircuitConfig, rng: random.Random) -> tuple[list[tuple[Head, ...]], bool]:
    """N random distinct k-subsets of C, or all of them at k = K when few enough (-> exhaustive flag)."""
    total = math.comb(len(C), k)
    if total <= cfg.n_samples or (k == cfg.K and total <= cfg.exhaustive_limit):
        return list(itertools.combinations(C, k)), True
    seen: set[tuple[Head, ...]] = set()
    while len(seen) < cfg.n_samples:
        seen.add(tuple(sorted(rng.sample(C, k))))
    return sorted(seen), False


def micro_search(
    S: SetScorer, C: frozenset[Head], threshold: float, cfg: CircuitConfig
) -> tuple[frozenset[Head], bool, list[dict]]:
    """Phase 2: binary search with stochastic pruning (module docstring); -> circuit, certified, trace."""
    rng = random.Random(cfg.seed)
    current = frozenset(C)
    k = max(cfg.K, len(current) // 2)
    trace: list[dict] = []
    while current and k <= len(current):
        subsets, exhaustive = _subsets(sorted(current), k, cfg, rng)
        scored = [(S(current - frozenset(t)), t) for t in subsets]
        best_score, best = max(scored)
        removed = best_score >= threshold
        trace.append({"k": k, "size": len(current), "tried": len(subsets), "best_remaining_score": best_score,
                      "removed": [list(h) for h in best] if removed else []})
        if removed:
            current = current - frozenset(best)
            k = max(cfg.K, min(k, len(current) // 2))
        elif k == cfg.K:
            return current, exhaustive, trace
        else:
            k = max(cfg.K, k // 2)
    return current, True, trace


def head_impacts(S: SetScorer) -> np.ndarray:
    """(L, H) removal impact (S(M) − S(M ∖ {h})) / (S(M) − S(B)) of each single head."""
    full, gap = S(S.all_heads), S(S.all_heads) - S(frozenset())
    out = np.zeros((S.L, S.H))
    for layer, head in sorted(S.all_heads):
        out[layer, head] = (full - S(S.all_heads - {(layer, head)})) / gap if gap else float("nan")
    return out


def search_circuit(model: nn.Module, data: EncodedPairs, cfg: CircuitConfig) -> Circuit:
    """Search-K-MSHC on one task of a model (module docstring)."""
    return search(model_scorer(model, data, cfg), data.name, cfg)


def search(S: SetScorer, task: str, cfg: CircuitConfig) -> Circuit:
    """Search-K-MSHC for the set function S (module docstring)."""
    full, ablated = S(S.all_heads), S(frozenset())
    threshold = ablated + cfg.eps * (full - ablated)
    drop, layers = macro_search(S, cfg)
    C = layer_heads(layers, S.H)
    fallback = S(C) < threshold
    if fallback:
        C = S.all_heads
    if full <= ablated:  # the model does not do the task: nothing to explain
        heads, certified, trace = frozenset(), False, [{"note": "S(M) <= S(B): the task is not solved"}]
    else:
        heads, certified, trace = micro_search(S, C, threshold, cfg)
    impact = head_impacts(S)
    ordered = sorted(heads)
    strong = [h for h in ordered if impact[h] >= cfg.strong_threshold]
    return Circuit(
        task=task, heads=ordered, score_full=full, score_ablated=ablated, threshold=threshold,
        score_circuit=S(heads), score_complement=S(S.all_heads - heads), layer_drop=drop,
        candidate_layers=layers, phase1_fallback=fallback, certified_minimal=certified,
        impact=impact.tolist(), strong=strong, weak=[h for h in ordered if h not in strong],
        evaluations=S.evaluations, steps=trace,
    )


def overlap(a: Circuit, b: Circuit) -> dict:
    """Jaccard |A ∩ B|/|A ∪ B|, impact-weighted Jaccard Σ min(w_a, w_b)/Σ max(w_a, w_b) over all heads
    (w = removal impact clipped at 0), and the shared strong and weak heads of two circuits."""
    A, B = set(a.heads), set(b.heads)
    wa, wb = np.clip(np.array(a.impact), 0, None), np.clip(np.array(b.impact), 0, None)
    denom = float(np.maximum(wa, wb).sum())
    return {
        "tasks": [a.task, b.task],
        "jaccard": len(A & B) / len(A | B) if A | B else float("nan"),
        "weighted_jaccard": float(np.minimum(wa, wb).sum()) / denom if denom > 0 else float("nan"),
        "shared": [list(h) for h in sorted(A & B)],
        "shared_strong": [list(h) for h in sorted(set(a.strong) & set(b.strong))],
        "shared_weak": [list(h) for h in sorted(set(a.weak) & set(b.weak))],
    }


def plot_circuits(circuits: Sequence[Circuit]):
    """One (layer × head) heatmap of removal impact per task, circuit heads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = max(1, len(circuits))
    L, H = np.array(circuits[0].impact).shape if circuits else (1, 1)
    fig, axes = plt.subplots(1, n, figsize=(1.5 + 0.55 * H * n + 1.2 * n, 1.4 + 0.45 * L), squeeze=False)
    for ax, c in zip(axes.flat, circuits, strict=False):
        im = ax.imshow(np.array(c.impact), cmap="viridis", aspect="auto")
        for layer, head in c.heads:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{c.task}: |H|={len(c.heads)}, recovered {c.recovered:.2f}", fontsize=9)
        fig.colorbar(im, ax=ax, label="removal impact / gap")
    fig.tight_layout()
    return fig
