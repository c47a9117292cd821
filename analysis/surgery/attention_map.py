"""The attention map of a head and the mask-pruning objective on it, with its closed-form gradient
(Liang, Long, Shi, Song & Zhou, ICLR 2025; docs/methods.md §9).

The paper prunes so as to preserve the non-linear attention map rather than the linear output
X W. For one head with calibration inputs X (n, d) (the attention's input, after its pre-norm)
and W = W_Q W_Kᵀ/√d_h, the map is A(W) = row-softmax(X W Xᵀ + causal mask), and a relaxed mask
M is learned by gradient descent on

    L(M) = ½ ‖A(M ⊙ W) − A(W)‖²_F + (λ/2) ‖M‖²_F,

then binarised to the target sparsity. `merged_mask_loss`/`merged_mask_grad` implement this
form literally (the closed-form gradient is G_M = (Xᵀ G_S X) ⊙ W + λM, with G_S the softmax
backward of G_A = A(M ⊙ W) − A(W), below).

For masks on the factors (analysis/surgery/pruning.py), W_eff = (M_Q ⊙ W_Q^h)(M_K ⊙ W_K^g)ᵀ/√d_h
and the scores use RoPE, S = s·R(Q) R(K)ᵀ with R_t the rotation at position t; R_t is
orthogonal, so its backward is the rotation by −θ_t.

Closed-form gradient of the factored loss (per sequence, batched over heads; ⊙ elementwise):

    Q = X (M_Q ⊙ W_Q)ᵀ,  K = X_K (M_K ⊙ W_K)ᵀ,  S = s·R(Q) R(K)ᵀ (+ causal −∞),  A = softmax(S)
    G_A = A − A_ref,     G_S = A ⊙ (G_A − rowsum(G_A ⊙ A))
    G_Q = Rᵀ(s·G_S R(K)),  G_K = Σ_{h ∈ g} Rᵀ(s·G_Sᵀ R(Q))
    ∂L/∂M_Q = (G_Qᵀ X) ⊙ W_Q + λ M_Q,   ∂L/∂M_K = (G_Kᵀ X_K) ⊙ W_K + λ M_K

L is summed over heads and averaged over calibration sequences.
"""

from dataclasses import dataclass

import torch

from models.gpt import causal_mask, rotate


def _rope(
    x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, inverse: bool = False
) -> torch.Tensor:
    """The model's RoPE R_t x_t of x (..., T, r) with tables (T, r); inverse applies R_tᵀ (angle −θ_t)."""
    if cos is None or sin is None:
        return x
    half = sin.shape[-1] // 2
    sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # the model's table [-sin θ, sin θ]
    return rotate(x, cos, -sin_signed if inverse else sin_signed)


def causal_softmax(S: torch.Tensor) -> torch.Tensor:
    """Row-softmax of scores S (..., T, T) with entries j > i masked out."""
    T = S.shape[-1]
    return torch.softmax(S.masked_fill(~causal_mask(T, T, S.device), float("-inf")), dim=-1)


@dataclass
class HeadInputs:
    """What one attention layer's QK map depends on, besides its weights.

    xq: (B, T, d) query-side inputs; xk: (G, B, T, d) key-side inputs per key head (equal to xq
    except under KV shifting); cos, sin: (T, r) RoPE tables or None; scale: softmax scale.
    """

    xq: torch.Tensor
    xk: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    scale: float


def attention_map(inp: HeadInputs, wq: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, T) = causal softmax(s·R(X W_Q^hᵀ) R(X_K W_K^gᵀ)ᵀ), wq (H, r, d), wk (G, r, d)."""
    H, G = wq.shape[0], wk.shape[0]
    q = _rope(torch.einsum("btd,hrd->bhtr", inp.xq, wq), inp.cos, inp.sin)  # (B, H, T, r)
    k = _rope(torch.einsum("gbtd,grd->bgtr", inp.xk, wk), inp.cos, inp.sin)  # (B, G, T, r)
    k = k.repeat_interleave(H // G, dim=1)  # (B, H, T, r)
    return causal_softmax(inp.scale * q @ k.transpose(-1, -2))  # (B, H, T, T)


def mask_loss(inp: HeadInputs, wq: torch.Tensor, wk: torch.Tensor, mq: torch.Tensor, mk: torch.Tensor,
              a_ref: torch.Tensor, lam: float) -> torch.Tensor:
    """L(M_Q, M_K) = (1/B) Σ_b Σ_h ½‖A(M ⊙ W) − A_ref‖²_F + (λ/2)(‖M_Q‖² + ‖M_K‖²), by autograd-able ops."""
    A = attention_map(inp, mq * wq, mk * wk)  # (B, H, T, T)
    fit = 0.5 * ((A - a_ref) ** 2).sum() / A.shape[0]
    return fit + 0.5 * lam * ((mq**2).sum() + (mk**2).sum())


def mask_grad(inp: HeadInputs, wq: torch.Tensor, wk: torch.Tensor, mq: torch.Tensor, mk: torch.Tensor,
              a_ref: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module docstring's closed form: -> L, ∂L/∂M_Q (H, r, d), ∂L/∂M_K (G, r, d)."""
    H, G = wq.shape[0], wk.shape[0]
    B = inp.xq.shape[0]
    q = _rope(torch.einsum("btd,hrd->bhtr", inp.xq, mq * wq), inp.cos, inp.sin)  # (B, H, T, r)
    k = _rope(torch.einsum("gbtd,grd->bgtr", inp.xk, mk * wk), inp.cos, inp.sin)  # (B, G, T, r)
    kh = k.repeat_interleave(H // G, dim=1)  # (B, H, T, r)
    A = causal_softmax(inp.scale * q @ kh.transpose(-1, -2))  # (B, H, T, T)
    GA = (A - a_ref) / B  # (B, H, T, T)
    loss = 0.5 * ((A - a_ref) ** 2).sum() / B + 0.5 * lam * ((mq**2).sum() + (mk**2).sum())
    GS = A * (GA - (GA * A).sum(-1, keepdim=True))  # (B, H, T, T)
    gq = _rope(inp.scale * GS @ kh, inp.cos, inp.sin, inverse=True)  # (B, H, T, r)
    gkh = _rope(inp.scale * GS.transpose(-1, -2) @ q, inp.cos, inp.sin, inverse=True)  # (B, H, T, r)
    gk = gkh.unflatten(1, (G, H // G)).sum(2)  # (B, G, T, r)
    grad_q = torch.einsum("bhtr,btd->hrd", gq, inp.xq) * wq + lam * mq  # (H, r, d)
    grad_k = torch.einsum("bgtr,gbtd->grd", gk, inp.xk) * wk + lam * mk  # (G, r, d)
    return loss, grad_q, grad_k


def merged_mask_loss(X: torch.Tensor, W: torch.Tensor, M: torch.Tensor, lam: float) -> torch.Tensor:
    """The paper's form for one head: ½‖A(M ⊙ W) − A(W)‖²_F + (λ/2)‖M‖²_F, A(W) = softmax(X W Xᵀ), X (n, d)."""
    A = causal_softmax(X @ (M * W) @ X.T)  # (n, n)
    A0 = causal_softmax(X @ W @ X.T)
    return 0.5 * ((A - A0) ** 2).sum() + 0.5 * lam * (M**2).sum()


def merged_mask_grad(X: torch.Tensor, W: torch.Tensor, M: torch.Tensor, lam: float) -> torch.Tensor:
    """Closed form ∂L/∂M = (Xᵀ G_S X) ⊙ W + λM, G_S = A ⊙ (G_A − rowsum(G_A ⊙ A)), G_A = A(M ⊙ W) − A(W)."""
    A = causal_softmax(X @ (M * W) @ X.T)  # (n, n)
    GA = A - causal_softmax(X @ W @ X.T)  # (n, n)
    GS = A * (GA - (GA * A).sum(-1, keepdim=True))  # (n, n)
    return (X.T @ GS @ X) * W + lam * M  # (d, d)
