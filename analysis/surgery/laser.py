"""LASER: layer-selective rank reduction (Sharma, Ash & Misra, ICLR 2024; docs/methods.md §9).

An intervention (τ, ℓ, ρ) replaces the weight W (m×n) of matrix type τ in layer ℓ by its
best rank-r approximation (Eckart-Young), r = max(1, ⌊ρ·min(m, n)⌋):

    W ← U_r diag(s_r) V_rᵀ        (U, s, V from the SVD of W)

computed with the exact `torch.linalg.svd` by default, or with the randomised
`torch.svd_lowrank(W, q, niter=2)` the paper's code uses (`method="lowrank"`). r is kept ≥ 1
(the paper's `int(max_rank·ρ)` can reach 0, which is the separate "zero" intervention).
Interventions compose: each acts on the current weight.

Matrix types τ (`TAU_MODULES`): q, k, v, o (attention), mlp_in (gate and up together; the
paper's fc_in and fc_up), mlp_gate, mlp_up, mlp_out (down), and MLA's latent projections
q_a_proj, q_b_proj, kv_a_proj_with_mqa (kv_a_proj for MLA-PreRoPE), kv_b_proj. A type
covers whichever of its modules the variant has; the tied embedding is never touched.

The search over interventions is analysis/surgery/laser_search.py.

RMT choice of ρ: keep the singular values above the Marchenko-Pastur bulk edge
σ̂(√m + √n) of an m×n noise matrix with i.i.d. entries of variance σ² (docs/methods.md §2),
by default raised by its Tracy-Widom fluctuation at level 1% (docs/methods.md §3),
σ̂² fitted robustly from the bulk by `analysis.spectral.rmt.robust_mp_sigma2` (median matching,
then a trimmed mean iterated below the edge), never from the IQR of the singular values
as laserRMT does (docs/methods.md §9, "RMT variant").
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from analysis.spectral.rmt import mp_tw_threshold, robust_mp_sigma2

SVDMethod = Literal["svd", "lowrank"]
Metric = Literal["loss", "acc"]

TAU_MODULES: dict[str, tuple[str, ...]] = {
    "q": ("attn.q_proj",),
    "k": ("attn.k_proj",),
    "v": ("attn.v_proj",),
    "o": ("attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_gate": ("mlp.gate_proj",),
    "mlp_up": ("mlp.up_proj",),
    "mlp_out": ("mlp.down_proj",),
    "q_a_proj": ("attn.q_a_proj",),
    "q_b_proj": ("attn.q_b_proj",),
    "kv_a_proj_with_mqa": ("attn.kv_a_proj_with_mqa",),
    "kv_a_proj": ("attn.kv_a_proj",),
    "kv_b_proj": ("attn.kv_b_proj",),
}
COMPOSE_SCHEDULE = (0.45, 0.9, 0.94, 0.98)  # removed fractions 1 − ρ of laser_compose.py


@dataclass(frozen=True)
class Intervention:
    """Keep a fraction rho of the maximum rank of matrix type tau in layer `layer`."""

    tau: str
    layer: int
    rho: float


# ----------------------------------------------------------------------------- matrices


def matrices(model: nn.Module, tau: str, layer: int) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every matrix of type tau in block `layer` of a GPT."""
    if tau not in TAU_MODULES:
        raise ValueError(f"matrix type tau={tau!r} is unknown; allowed: {sorted(TAU_MODULES)}")
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer={layer} is out of range: the model has {len(model.blocks)} layers")
    block = model.blocks[layer]
    found = [(f"blocks.{layer}.{p}", block.get_submodule(p)) for p in TAU_MODULES[tau] if _has(block, p)]
    if not found:
        raise ValueError(f"tau={tau!r} has no matrix in this model ({model.config.attention.name.value}); "
                         f"available: {available_taus(model)}")
    return found


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def available_taus(model: nn.Module) -> list[str]:
    """The matrix types this model has (checked on block 0)."""
    return [t for t, paths in TAU_MODULES.items() if any(_has(model.blocks[0], p) for p in paths)]


# ------------------------------------------------------------------------ rank reduction


def target_rank(shape: Sequence[int], rho: float) -> int:
    """r = max(1, ⌊ρ·min(m, n)⌋) (paper: int(max_rank·ρ)); a tiny epsilon absorbs float error in ρ·k."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho} is invalid; allowed: 0 < rho <= 1")
    k = min(shape)
    return max(1, min(k, math.floor(rho * k + 1e-9)))


def low_rank(W: torch.Tensor, rank: int, method: SVDMethod = "svd", niter: int = 2) -> torch.Tensor:
    """Best rank-`rank` approximation U_r diag(s_r) V_rᵀ of W (m, n), in fp32, cast back to W's dtype.

    method "svd": exact `torch.linalg.svd`; "lowrank": `torch.svd_lowrank(W, q=rank, niter)`
    (Halko et al. 2011), what the paper's `do_low_rank` calls.
    """
    Wf = W.detach().float()
    if rank >= min(Wf.shape):
        return W.detach().clone()
    if method == "svd":
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)  # (m, k), (k,), (k, n)
        out = (U[:, :rank] * S[:rank]) @ Vh[:rank]  # (m, n)
    elif method == "lowrank":
        U, S, V = torch.svd_lowrank(Wf, q=rank, niter=niter)  # (m, r), (r,), (n, r)
        out = (U * S) @ V.T  # (m, n)
    else:
        raise ValueError(f"method={method!r} is invalid; allowed: ['svd', 'lowrank']")
    return out.to(W.dtype)


class SVDCache:
    """Exact SVDs of original weights, so every ρ of one matrix costs one decomposition."""

    def __init__(self) -> None:
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def reduce(self, name: str, W: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank-`rank` approximation of the weight `W` registered under `name` (its first version)."""
        if name not in self._svd:
            self._svd[name] = torch.linalg.svd(W.detach().float(), full_matrices=False)
        U, S, Vh = self._svd[name]
        if rank >= S.numel():
            return (U * S) @ Vh
        return (U[:, :rank] * S[:rank]) @ Vh[:rank]  # (m, n)


@torch.no_grad()
def apply_interventions(
    model: nn.Module, interventions: Sequence[Intervention], method: SVDMethod = "svd",
    cache: SVDCache | None = None,
) -> list[dict[str, object]]:
    """Apply each intervention in order, in place; -> one record (matrix, shape, rank) per matrix touched.

    With `cache`, exact SVDs of the *original* weights are reused (valid only while each matrix
    receives at most one intervention from its original state, as in the grid search).
    """
    done = []
    for iv in interventions:
        for name, module in matrices(model, iv.tau, iv.layer):
            W = module.weight
            rank = target_rank(W.shape, iv.rho)
            if cache is not None and method == "svd":
                new = cache.reduce(name, W, rank)
            else:
                new = low_rank(W, rank, method)
            W.copy_(new.to(W.dtype))
            done.append({"matrix": name, "shape": list(W.shape), "rank": rank, **asdict(iv)})
    return done


@contextmanager
def intervened(
    model: nn.Module, interventions: Sequence[Intervention], method: SVDMethod = "svd",
    cache: SVDCache | None = None,
) -> Iterator[list[dict[str, object]]]:
    """Apply interventions for the duration of the block; the original weights are restored on exit."""
    touched = {name: m for iv in interventions for name, m in matrices(model, iv.tau, iv.layer)}
    saved = {name: m.weight.detach().clone() for name, m in touched.items()}
    try:
        yield apply_interventions(model, interventions, method, cache)
    finally:
        with torch.no_grad():
            for name, m in touched.items():
                m.weight.copy_(saved[name])


# ------------------------------------------------------------------------------- RMT rank


def mp_keep_rank(W: torch.Tensor, tw_level: float | None = 0.01) -> dict[str, float]:
    """Singular values of W (m, n) above the MP bulk edge; -> rank, rho, sigma, edge.

    The eigenvalues λ_i = s_i²/N (N = max(m, n), M = min(m, n)) of a pure-noise W follow
    MP(M/N, σ²) (docs/methods.md §2); σ̂² = `robust_mp_sigma2(λ, N, M)` is fitted on the bulk, so the
    spikes being counted do not inflate it. The edge is σ̂(√m + √n) (tw_level None), or by
    default that edge plus its Tracy-Widom fluctuation at level tw_level (docs/methods.md §3,
    `mp_tw_threshold`): at finite size the top noise singular value exceeds the plain edge about
    as often as not, and would be kept as signal. The kept rank is at least 1.
    """
    s = torch.linalg.svdvals(W.detach().double())  # (M,)
    m, n = W.shape
    N, M = max(m, n), min(m, n)
    sigma2 = float(robust_mp_sigma2(s**2 / N, N, M))
    if tw_level is None:
        edge = math.sqrt(sigma2) * (math.sqrt(m) + math.sqrt(n))
    else:
        edge = math.sqrt(N * mp_tw_threshold(N, M, tw_level, sigma2))
    rank = max(1, int((s > edge).sum()))
    return {"rank": rank, "rho": rank / M, "sigma": math.sqrt(sigma2), "edge": edge, "s_max": float(s[0])}


def rmt_interventions(
    model: nn.Module, taus: Sequence[str], layers: Sequence[int], tw_level: float | None = 0.01
) -> list[tuple[Intervention, dict]]:
    """One intervention per (τ, ℓ) with ρ from `mp_keep_rank`; for τ with several matrices (mlp_in)
    the largest kept fraction of its matrices is used, so no matrix loses spikes."""
    out = []
    for tau in taus:
        for layer in layers:
            fits = [mp_keep_rank(m.weight, tw_level) for _, m in matrices(model, tau, layer)]
            best = max(fits, key=lambda f: f["rho"])
            out.append((Intervention(tau, layer, best["rho"]), best))
    return out
