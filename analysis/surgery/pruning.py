"""Attention-matrix mask pruning (Liang, Long, Shi, Song & Zhou, ICLR 2025; docs/methods.md §9) of a model.

Masks are learned on the objective of analysis/surgery/attention_map.py (or scored by magnitude
|W_ij| and Wanda |W_ij|·‖X_j‖₂, Sun et al. 2024, ‖X_j‖₂ the norm of input feature j over every
calibration token) and multiplied into the model's weights.

Mask placement (our choice): the model keeps its factorisation. The masks sit on the factors,
M_Q on W_Q^h (d_h × d, the rows of q_proj for head h) and M_K on W_K^g (the rows of k_proj for
key head g), so W_eff = (M_Q ⊙ W_Q^h)(M_K ⊙ W_K^g)ᵀ/√d_h. A mask on the merged d × d product is
not representable by q_proj/k_proj (a sparse W_Q W_Kᵀ is in general not a product of sparse
factors of rank d_h), whereas masked factors leave a normal model with sparse q_proj and
k_proj weights that every tool, the trainer and `generate()` load unchanged. For GQA the key
mask of group g is shared by its H/G query heads, so its loss sums over them.

Positions: scores use the module's own RoPE tables, read from its QK probe (the pruned model is
judged by the map it actually computes). KV-shifting attention is covered too: its key input is
α1 x_t + α2 x_{t−1} per key head (the shift precedes RoPE and is linear), and that shifted
input is what W_K^g multiplies. MLA variants are refused: their query/key paths run through
latent RMSNorms whose per-token 1/RMS scale makes the map depend on the whole latent, so a mask
on q_b_proj/kv_b_proj's W_UK rows would need its own derivation (not done here).

Learning and binarisation (the paper's text does not fix them; our choices, `LearnConfig`):
M starts at 1, where the fidelity term's gradient vanishes; the penalty shrinks every entry and
the fidelity term holds back those the map needs (near equilibrium M_ij ≈ h/(h + λ), h the
curvature of the fit in M_ij, an OBD-like saliency). Entries are ranked by |M ⊙ W| (default) or
by M, and the top (1 − sparsity) are kept. Options: `rounds` > 1 reaches the sparsity in steps,
relearning M on the survivors; `refit` keeps the values of M fitted on the final support with
λ = 0 (weights M ⊙ W rather than W; still a plain sparse model). Adam on the closed-form
gradient is the default optimiser; plain gradient descent (`optimizer=gd`) is the paper's, but
at η = 0.05 its steps are tiny (the fit term's gradient is O(1e-3) or less), so M barely moves
from 1 and the ranking becomes magnitude pruning's. `scripts/surgery_study.py kjv` measures the
methods on the default run.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from analysis.surgery.attention_map import HeadInputs, attention_map, mask_grad
from analysis.surgery.scoring import block_metrics
from models.kv_shift import shift
from models.probe import QKFactors

Method = Literal["learned", "magnitude", "wanda"]
Group = Literal["matrix", "row"]
METHODS = ("learned", "magnitude", "wanda")


def _content_factors(attn: nn.Module) -> QKFactors:
    """The module's one content QK form, if its factors are the rows of q_proj and k_proj: the QK probe
    of MHA, GQA and KV shifting says so by a single "content" form with `n_kv_head` in its meta."""
    factors = attn.qk_factors()
    if [f.kind for f in factors] != ["content"] or "n_kv_head" not in factors[0].meta:
        raise NotImplementedError(
            f"attention-matrix pruning supports mha, gqa and kv_shift (q_proj/k_proj factors); got "
            f"{type(attn).__name__}. MLA's queries/keys pass through latent RMSNorms, so masking "
            f"q_b_proj/kv_b_proj needs its own derivation (see analysis/surgery/pruning.py)"
        )
    return factors[0]


def head_inputs(attn: nn.Module, x: torch.Tensor) -> HeadInputs:
    """The QK inputs of an MHA/GQA/KV-shift module given its input x (B, T, d) (after the pre-norm), from
    its QK probe: the KV-shift weights α1, α2 of each key head (probe meta), the RoPE tables and the
    softmax scale (its logit term)."""
    factors = _content_factors(attn)
    B, T, d = x.shape
    G = int(factors.meta["n_kv_head"])
    xk = x.unsqueeze(0).expand(G, B, T, d)  # (G, B, T, d)
    if "alpha1_mean" in factors.meta:  # KV shifting: the key reads α1 x_t + α2 x_{t-1}
        a1, a2 = (torch.tensor([factors.meta[f"{a}_h{g}"] for g in range(G)], dtype=x.dtype)[:, None, None, None]
                  for a in ("alpha1", "alpha2"))  # (G, 1, 1, 1)
        xk = a1 * x + a2 * shift(x)  # (G, B, T, d)
    (term,) = attn.logit_terms(torch.ones(d, device=x.device))
    cos, sin = term.rotary_cos[:T].to(x.dtype), term.rotary_sin[:T].to(x.dtype)  # (T, r)
    return HeadInputs(xq=x, xk=xk, cos=cos, sin=sin, scale=term.scale)


def qk_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Views W_Q (H, r, d), W_K (G, r, d) of q_proj/k_proj (rows of head h are h·r .. h·r + r − 1)."""
    f = _content_factors(attn)
    H, d, r = f.left.shape
    return attn.q_proj.weight.view(H, r, d), attn.k_proj.weight.view(int(f.meta["n_kv_head"]), r, d)


@torch.no_grad()
def attention_inputs(model: nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention input (after the pre-norm), x (B, T, d), from a forward pass over idx (B, T)."""
    captured: list[torch.Tensor] = [torch.empty(0)] * len(model.blocks)

    def grab(layer: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[layer] = args[0].detach()

        return hook

    handles = [b.attn.register_forward_pre_hook(grab(i)) for i, b in enumerate(model.blocks)]
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
    return captured


# --------------------------------------------------------------------------- scores, masks


@dataclass
class LearnConfig:
    """Mask learning: `rounds` × T steps of `optimizer` on L(M), pruning gradually (module docstring)."""

    lam: float = 1e-5  # λ of the (λ/2)‖M‖² penalty
    lr: float = 0.05  # step size η
    steps: int = 200  # T per round
    optimizer: Literal["gd", "adam"] = "adam"  # gd: M ← M − η∇L (the paper); adam: Adam on ∇L
    score: Literal["mask", "masked_weight"] = "masked_weight"  # rank entries by M or by |M ⊙ W|
    rounds: int = 1  # sparsity reached in this many equal steps, relearning M on the survivors each time
    refit: bool = False  # finally fit M on the kept entries with λ = 0 and keep M ⊙ W (not just W)

    def __post_init__(self) -> None:
        if self.optimizer not in ("gd", "adam") or self.score not in ("mask", "masked_weight"):
            raise ValueError(f"learn.optimizer={self.optimizer!r} (gd | adam), learn.score={self.score!r} "
                             f"(mask | masked_weight)")
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("learn.rounds and learn.steps must be >= 1")


def learn_masks(
    inp: HeadInputs, wq: torch.Tensor, wk: torch.Tensor, cfg: LearnConfig, lam: float | None = None,
    support: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Relaxed masks M_Q (H, r, d), M_K (G, r, d) minimising L with the closed-form gradient (the
    target is always the dense map A(W)); entries outside `support` (0/1 tensors) stay 0. -> with the loss trace."""
    lam = cfg.lam if lam is None else lam
    with torch.no_grad():
        a_ref = attention_map(inp, wq, wk)  # (B, H, T, T)
    sq, sk = support if support is not None else (torch.ones_like(wq), torch.ones_like(wk))
    mq, mk = sq.clone(), sk.clone()
    opt = torch.optim.Adam([mq, mk], lr=cfg.lr) if cfg.optimizer == "adam" else None
    trace = []
    for _ in range(cfg.steps):
        loss, gq, gk = mask_grad(inp, wq, wk, mq, mk, a_ref, lam)
        trace.append(float(loss))
        gq, gk = gq * sq, gk * sk  # projected: pruned entries get no update
        if opt is None:
            mq.sub_(cfg.lr * gq)
            mk.sub_(cfg.lr * gk)
        else:
            mq.grad, mk.grad = gq, gk
            opt.step()
            mq.mul_(sq)
            mk.mul_(sk)
    return mq, mk, trace


def learned_masks(
    inp: HeadInputs, wq: torch.Tensor, wk: torch.Tensor, sparsity: float, group: Group, cfg: LearnConfig
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Final masks of the learned method: in round j = 1..R learn M on the current support, score
    the survivors (M, or |M ⊙ W|) and keep the best to sparsity s·j/R; then 0/1 masks, or with
    `refit` the values of M fitted on the final support with λ = 0."""
    support = (torch.ones_like(wq), torch.ones_like(wk))
    first = last = 0.0
    for j in range(1, cfg.rounds + 1):
        mq, mk, trace = learn_masks(inp, wq, wk, cfg, support=support)
        first = trace[0] if j == 1 else first
        last = trace[-1]
        scores = [(m if cfg.score == "mask" else (m * w).abs()).masked_fill(s == 0, float("-inf"))
                  for m, w, s in ((mq, wq, support[0]), (mk, wk, support[1]))]
        support = tuple(binarize(sc.flatten(0, 1), sparsity * j / cfg.rounds, group).view_as(sc) for sc in scores)
    info = {"loss_first": first, "loss_last": last, "mask_q_mean": float(mq.mean()), "mask_k_mean": float(mk.mean())}
    if not cfg.refit:
        return support[0], support[1], info
    mq, mk, trace = learn_masks(inp, wq, wk, cfg, lam=0.0, support=support)
    info["refit_loss"] = trace[-1]
    return mq, mk, info


def wanda_score(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij|·‖X_j‖₂ for w (..., r, d), inputs x (..., B, T, d) whose leading dims (if any) are w's."""
    norms = x.flatten(-3, -2).norm(dim=-2)  # (..., d): norm of each input feature over all tokens
    return w.abs() * norms.unsqueeze(-2)  # (..., r, d)


def binarize(score: torch.Tensor, sparsity: float, group: Group = "matrix") -> torch.Tensor:
    """0/1 mask zeroing the ⌊sparsity·n⌋ lowest scores of each group: the whole tensor ("matrix")
    or each output row, i.e. each last-dim row of the (rows, d) projection ("row", Wanda's choice)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} is invalid; allowed: 0 <= sparsity < 1")
    flat = score.reshape(1, -1) if group == "matrix" else score.reshape(-1, score.shape[-1])  # (groups, n)
    k = int(sparsity * flat.shape[1])
    mask = torch.ones_like(flat)
    if k > 0:
        drop = flat.argsort(dim=1, stable=True)[:, :k]  # (groups, k)
        mask.scatter_(1, drop, 0.0)
    return mask.view_as(score)


@dataclass
class PruneConfig:
    """What to prune and how (Q and K projections of every layer)."""

    method: Method = "learned"
    sparsity: float = 0.5  # fraction of zeros in each q_proj and k_proj
    group: Group = "matrix"  # where the sparsity is met: per projection matrix or per output row
    learn: LearnConfig | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid; allowed: {list(METHODS)}")
        if self.group not in ("matrix", "row"):
            raise ValueError(f"group={self.group!r} is invalid; allowed: ['matrix', 'row']")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity={self.sparsity} is invalid; allowed: 0 <= sparsity < 1")
        if isinstance(self.learn, dict):
            self.learn = LearnConfig(**self.learn)
        self.learn = self.learn or LearnConfig()


def layer_masks(attn: nn.Module, x: torch.Tensor, cfg: PruneConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Masks for W_Q (H, r, d) and W_K (G, r, d) of one layer whose input is x (B, T, d)."""
    wq, wk = (w.detach().float() for w in qk_weights(attn))
    if cfg.method == "learned":
        return learned_masks(head_inputs(attn, x.float()), wq, wk, cfg.sparsity, cfg.group, cfg.learn)
    if cfg.method == "magnitude":
        sq, sk = wq.abs(), wk.abs()
    else:
        inp = head_inputs(attn, x.float())
        sq, sk = wanda_score(wq, inp.xq), wanda_score(wk, inp.xk)
    masks = [binarize(sc.flatten(0, 1), cfg.sparsity, cfg.group).view_as(sc) for sc in (sq, sk)]
    return masks[0], masks[1], {}


@torch.no_grad()
def prune_qk(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig) -> list[dict]:
    """Multiply every layer's q_proj and k_proj by its masks in place (one shot: all layers are
    scored on the dense model's inputs for calib (B, T)). -> one record per layer."""
    xs = attention_inputs(model, calib)
    records = []
    for layer, block in enumerate(model.blocks):
        mq, mk, info = layer_masks(block.attn, xs[layer], cfg)
        for proj, mask in ((block.attn.q_proj, mq), (block.attn.k_proj, mk)):
            proj.weight.mul_(mask.flatten(0, 1).to(proj.weight.dtype))
        zeros = [float((p.weight == 0).float().mean()) for p in (block.attn.q_proj, block.attn.k_proj)]
        records.append({"layer": layer, "sparsity_q": zeros[0], "sparsity_k": zeros[1], **info})
    return records


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def attention_errors(dense: nn.Module, pruned: nn.Module, idx: torch.Tensor) -> dict[str, float | list[float]]:
    """Relative attention-map error ‖A_pruned − A_dense‖_F / ‖A_dense‖_F on idx (B, T), per layer:

    "local": both maps from the dense model's layer inputs (the quantity the objective fits);
    "e2e": the pruned map from the pruned model's own inputs (errors of earlier layers included).
    Each per layer is summed over heads and blocks; the means are over layers.
    """
    xd, xp = attention_inputs(dense, idx), attention_inputs(pruned, idx)
    local, e2e = [], []
    for layer, (bd, bp) in enumerate(zip(dense.blocks, pruned.blocks, strict=True)):
        a_dense = attention_map(head_inputs(bd.attn, xd[layer]), *qk_weights(bd.attn))  # (B, H, T, T)
        a_local = attention_map(head_inputs(bp.attn, xd[layer]), *qk_weights(bp.attn))
        a_e2e = attention_map(head_inputs(bp.attn, xp[layer]), *qk_weights(bp.attn))
        norm = a_dense.norm()
        local.append(float((a_local - a_dense).norm() / norm))
        e2e.append(float((a_e2e - a_dense).norm() / norm))
    return {"attn_err": float(np.mean(local)), "attn_err_e2e": float(np.mean(e2e)),
            "attn_err_layers": local, "attn_err_e2e_layers": e2e}


def pruned_copy(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig) -> tuple[nn.Module, list[dict]]:
    """A deep copy of `model` pruned by `cfg` (the original is untouched), and the per-layer records."""
    twin = copy.deepcopy(model).eval()
    return twin, prune_qk(twin, calib, cfg)


def evaluate_pruned(dense: nn.Module, pruned: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    n_attn_blocks: int = 16, batch_size: int = 32) -> dict:
    """Attention-map errors on the first n_attn_blocks of x, and next-token loss/perplexity on all of x, y (N, T)."""
    loss, acc = block_metrics(pruned, x, y, batch_size)
    errs = attention_errors(dense, pruned, x[:n_attn_blocks])
    return {**errs, "val_loss": float(loss.mean()), "val_ppl": float(np.exp(loss.mean())), "val_acc": float(acc.mean())}


def prune_study(model: nn.Module, calib: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                configs: Sequence[PruneConfig], n_attn_blocks: int = 16,
                keep: PruneConfig | None = None) -> tuple[list[dict], nn.Module | None]:
    """The dense model, then one pruned copy per config, each scored by `evaluate_pruned`;
    -> the rows and the pruned copy for the config equal to `keep` (None if none is)."""
    model.eval()
    kept = None
    dense_loss, dense_acc = block_metrics(model, x, y)
    rows = [{"method": "dense", "sparsity": 0.0, "attn_err": 0.0, "attn_err_e2e": 0.0,
             "val_loss": float(dense_loss.mean()), "val_ppl": float(np.exp(dense_loss.mean())),
             "val_acc": float(dense_acc.mean())}]
    for cfg in configs:
        pruned, layers = pruned_copy(model, calib, cfg)
        scores = evaluate_pruned(model, pruned, x, y, n_attn_blocks)
        rows.append({"method": cfg.method, "sparsity": cfg.sparsity, **scores, "layers": layers})
        if cfg == keep:
            kept = pruned
    return rows, kept


def plot_study(rows: Sequence[dict], title: str = "attention-matrix pruning"):
    """Validation perplexity and held-out attention-map error vs sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["sparsity"], r["val_ppl"], r["attn_err"], r["attn_err_e2e"]) for r in rows
                     if r["method"] == method)
        for ax, col in zip(axes, (1, 2, 3), strict=True):
            ax.plot([p[0] for p in pts], [p[col] for p in pts], marker="o", label=method)
    if dense is not None:
        axes[0].axhline(dense["val_ppl"], color="black", ls="--", lw=1, label="dense")
    for ax, label in zip(axes, ("validation perplexity", "attention-map error (layer-local)",
                                "attention-map error (end to end)"), strict=True):
        ax.set_xlabel("sparsity of W_Q, W_K")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
