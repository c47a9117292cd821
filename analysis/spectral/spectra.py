"""Spectra of low-rank bilinear forms A Bᵀ from their factors, never forming the d×d product.

For A, B of shape (d, r), r ≤ d: A = Q_A R_A, B = Q_B R_B (reduced QR), so
A Bᵀ = Q_A (R_A R_Bᵀ) Q_Bᵀ and, Q_A, Q_B having orthonormal columns, the nonzero singular
values of A Bᵀ are those of the r×r core R_A R_Bᵀ; with core = U S Vᵀ the top singular
vectors in d-space are Q_A u₁ and Q_B v₁ (docs/methods.md §1,
"per-head bilinear form"). The singular values of A alone are those of R_A, so the factor
spectra come for free.

Batching: all heads of all layers go through the r×r decompositions in one batched call.
The factors can be given as one tensor (..., d, r) or as chunks (one (H, d, r) tensor per
layer): the O(d r²) work (the Gram matrices) then runs chunk by chunk, so the big factors are
never stacked or converted to float64 all at once. Everything runs on the tensors' device.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Factors = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class ProductSpectra:
    """Singular values of A Bᵀ and of its factors, batched over the leading dims `...`.

    Attributes:
        sv: (..., r) singular values of A Bᵀ, descending.
        left_sv: (..., r) singular values of A, descending.
        right_sv: (..., r) singular values of B, descending.
        top_u: (..., d) top left singular vector of A Bᵀ (unit norm, sign arbitrary), or None.
        top_v: (..., d) top right singular vector of A Bᵀ, or None.
        finite: (...) bool, False where A or B had a non-finite entry (then all outputs are NaN).
    """

    sv: torch.Tensor
    left_sv: torch.Tensor
    right_sv: torch.Tensor
    top_u: torch.Tensor | None
    top_v: torch.Tensor | None
    finite: torch.Tensor


@contextmanager
def lapack_threads(n: int | None) -> Iterator[None]:
    """Run the enclosed torch ops with n intra-op CPU threads (None: leave the setting alone).

    Batched small LAPACK calls (r×r eigh/Cholesky, one matrix at a time) gain nothing from
    threads, and on a shared CPU a descheduled OpenMP thread stalls every one of them (README,
    Performance). The previous setting is restored on exit.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _chunks(x: Factors) -> list[torch.Tensor]:
    """(n_i, d, r) chunks of a factor batch given as a tensor (..., d, r) or a sequence of them."""
    if isinstance(x, torch.Tensor):
        return [x.reshape(-1, *x.shape[-2:])]
    return [t.reshape(-1, *t.shape[-2:]) for t in x]


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx in float64 for x (..., d, r), detached: (..., r, r)."""
    xd = x.detach().double()
    return xd.mT @ xd


def triangular_factor(x: torch.Tensor, method: str = "cholesky", g: torch.Tensor | None = None) -> torch.Tensor:
    """R of the reduced QR x = Q R for x (..., d, r) with r ≤ d: (..., r, r) upper triangular, float64.

    method "qr": LAPACK Householder QR (`torch.linalg.qr(mode="r")`) in float64.
    method "cholesky" (Cholesky-QR): R = Lᵀ with L Lᵀ = xᵀx, the Gram matrix formed and factored
    in float64 (Golub & Van Loan, Matrix Computations, §5.2.2: the same R as Householder QR up to
    the signs of its rows, which change no singular value). Several times faster than batched
    Householder on CPU for d ≫ r; its error grows like ε₆₄·cond(x)², so matrices whose Cholesky
    fails or whose R has a diagonal ratio below 1e-6 (cond(x) ≳ 1e6, e.g. a dead column) fall
    back to Householder QR. `g` (the float64 Gram xᵀx) may be passed when already computed.
    """
    if method == "qr":
        return torch.linalg.qr(x.detach().double(), mode="r")[1]
    if method != "cholesky":
        raise ValueError(f"method={method!r}; allowed: 'cholesky', 'qr'")
    R = _cholesky_r(gram(x) if g is None else g)
    bad = _ill_conditioned(R)
    if bool(bad.any()):
        R = R.clone()
        R[bad] = torch.linalg.qr(x.detach().double()[bad], mode="r")[1]
    return R


def _cholesky_r(g: torch.Tensor) -> torch.Tensor:
    """Upper R with RᵀR = g; rows where the factorisation failed are NaN."""
    L, info = torch.linalg.cholesky_ex(g)
    return torch.where((info == 0)[..., None, None], L.mT, torch.full_like(L, float("nan")))


def _ill_conditioned(R: torch.Tensor) -> torch.Tensor:
    diag = R.diagonal(dim1=-2, dim2=-1).abs()
    return ~(diag.amin(-1) > 1e-6 * diag.amax(-1))  # also True for NaN


def core_spectra(
    RA: torch.Tensor, RB: torch.Tensor, GA: torch.Tensor, GB: torch.Tensor, vectors: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Spectra of A Bᵀ from the triangular factors R and Grams G = RᵀR = AᵀA of both factors.

    Returns (S, sv(A), sv(B), U₀, V₀), all float64, descending: S the singular values of the
    core C = R_A R_Bᵀ from the symmetric eigenproblem CᵀC = R_B G_A R_Bᵀ (S², V), U₀ = C V₀
    (unnormalised, ∝ the top left singular vector of C), factor singular values √eig(G).
    Used by `product_spectra` and, with Bartlett-sampled R, by the Monte-Carlo null, so both
    compute the same numbers the same way. Absolute error ≈ 1e-16·s₁² in s² (relative error
    < 1e-6 for every s_i > 1e-5·s₁).
    """
    left_sv = torch.linalg.eigvalsh(GA).clamp_min(0).sqrt().flip(-1)
    right_sv = torch.linalg.eigvalsh(GB).clamp_min(0).sqrt().flip(-1)
    K = RB @ GA @ RB.mT  # CᵀC, (..., r, r)
    K = (K + K.mT) / 2
    if not vectors:
        return torch.linalg.eigvalsh(K).clamp_min(0).sqrt().flip(-1), left_sv, right_sv, None, None
    ev, V = torch.linalg.eigh(K)  # ascending
    V0 = V[..., :, -1:]  # (..., r, 1)
    U0 = RA @ (RB.mT @ V0)
    return ev.clamp_min(0).sqrt().flip(-1), left_sv, right_sv, U0, V0


def product_spectra(
    left: Factors,
    right: Factors,
    dtype: torch.dtype = torch.float32,
    vectors: bool = True,
    method: str = "cholesky",
) -> ProductSpectra:
    """Singular values (and top singular vectors) of every A Bᵀ from the triangular QR factors.

    left, right: tensors (..., d, r) with r ≤ d, or equal-length sequences of (n_i, d, r) chunks
    (results are then concatenated: leading shape (Σ n_i,)). Cost O(d r²) per matrix, not O(d³).
    With A = Q_A R_A, B = Q_B R_B (`triangular_factor`) and core C = R_A R_Bᵀ = U S Vᵀ:
    the singular values of A Bᵀ are S, and its top singular vectors are u₁ = Q_A U₀ = A R_Bᵀ V₀/s₁
    and v₁ = Q_B V₀ = B R_Aᵀ U₀/s₁ (as Q_Aᵀ A = R_A), so Q is never formed.
    method "cholesky" (default): Cholesky-QR and the symmetric eigenproblem of `core_spectra`.
    method "qr": Householder QR and a dense SVD of C (the textbook route, kept as a cross-check).
    Decompositions run in float64 on the tensors' device; `dtype` is the precision of the
    outputs (and of the top-vector products). Never raises on non-finite input: such matrices
    are reported as NaN with finite=False.
    """
    lead = left.shape[:-2] if isinstance(left, torch.Tensor) else None
    As, Bs = _chunks(left), _chunks(right)
    if len(As) != len(Bs) or any(a.shape != b.shape for a, b in zip(As, Bs, strict=True)):
        raise ValueError("left and right factors must have equal shapes (..., d, r)")
    d, r = As[0].shape[-2:]
    if r > d:
        raise ValueError(f"factor rank r={r} exceeds d={d}")
    with torch.no_grad():
        GA = torch.cat([gram(a) for a in As])  # (N, r, r) float64
        GB = torch.cat([gram(b) for b in Bs])
        ok = _finite_gram(GA) & _finite_gram(GB)
        eye = torch.eye(r, dtype=GA.dtype, device=GA.device)
        GA, GB = torch.where(ok[:, None, None], GA, eye), torch.where(ok[:, None, None], GB, eye)
        if method == "cholesky":
            RA, RB = _cholesky_r(GA), _cholesky_r(GB)
            RA, RB = _qr_fallback(RA, As, ok), _qr_fallback(RB, Bs, ok)
            S, left_sv, right_sv, U0, V0 = core_spectra(RA, RB, GA, GB, vectors)
        elif method == "qr":
            RA = torch.cat([triangular_factor(a, "qr") for a in _zero_bad(As, ok)])
            RB = torch.cat([triangular_factor(b, "qr") for b in _zero_bad(Bs, ok)])
            left_sv, right_sv = torch.linalg.svdvals(RA), torch.linalg.svdvals(RB)
            U, S, Vh = torch.linalg.svd(RA @ RB.mT)
            V0, U0 = Vh[..., :1, :].mT, U[..., :, :1]
        else:
            raise ValueError(f"method={method!r}; allowed: 'cholesky', 'qr'")
        nan = torch.tensor(float("nan"), dtype=dtype, device=S.device)
        keep = ok[:, None]
        top_u = top_v = None
        if vectors:
            top_u = torch.where(keep, _top_vector(As, RB.mT @ V0, dtype), nan)  # A R_Bᵀ V₀
            top_v = torch.where(keep, _top_vector(Bs, RA.mT @ U0, dtype), nan)  # B R_Aᵀ U₀
        out = ProductSpectra(
            sv=torch.where(keep, S.to(dtype), nan),
            left_sv=torch.where(keep, left_sv.to(dtype), nan),
            right_sv=torch.where(keep, right_sv.to(dtype), nan),
            top_u=top_u,
            top_v=top_v,
            finite=ok,
        )
    if lead is not None:
        out = ProductSpectra(
            sv=out.sv.reshape(*lead, r),
            left_sv=out.left_sv.reshape(*lead, r),
            right_sv=out.right_sv.reshape(*lead, r),
            top_u=None if top_u is None else out.top_u.reshape(*lead, d),
            top_v=None if top_v is None else out.top_v.reshape(*lead, d),
            finite=out.finite.reshape(lead),
        )
    return out


def _finite_gram(g: torch.Tensor) -> torch.Tensor:
    """A factor is finite iff its Gram diagonal is: a NaN or ±inf entry makes Σ_i x_ij² NaN or inf
    (float64 squares of float32/bf16 values cannot overflow)."""
    return torch.isfinite(g.diagonal(dim1=-2, dim2=-1)).all(-1)


def _zero_bad(chunks: list[torch.Tensor], ok: torch.Tensor) -> list[torch.Tensor]:
    """Chunks with the non-finite matrices zeroed (LAPACK SVD may raise on NaN)."""
    out, start = [], 0
    for c in chunks:
        keep = ok[start : start + c.shape[0], None, None]
        out.append(torch.where(keep, c.detach(), torch.zeros((), dtype=c.dtype, device=c.device)))
        start += c.shape[0]
    return out


def _qr_fallback(R: torch.Tensor, chunks: list[torch.Tensor], ok: torch.Tensor) -> torch.Tensor:
    """Replace R of finite but ill-conditioned matrices by Householder QR (see `triangular_factor`)."""
    bad = _ill_conditioned(R) & ok
    if not bool(bad.any()):
        return torch.where(ok[:, None, None], R, torch.eye(R.shape[-1], dtype=R.dtype, device=R.device))
    R = R.clone()
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + c.shape[0])
    for i in torch.nonzero(bad).flatten().tolist():
        j = next(k for k in range(len(chunks)) if offsets[k] <= i < offsets[k + 1])
        R[i] = torch.linalg.qr(chunks[j][i - offsets[j]].detach().double(), mode="r")[1]
    return torch.where(ok[:, None, None], R, torch.eye(R.shape[-1], dtype=R.dtype, device=R.device))


def _top_vector(chunks: list[torch.Tensor], w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit vectors x_i w_i for the factors x_i (chunked) and small vectors w (N, r, 1): (N, d)."""
    out, start = [], 0
    for c in chunks:
        n = c.shape[0]
        out.append((c.detach().to(dtype) @ w[start : start + n].to(dtype)).squeeze(-1))
        start += n
    u = torch.cat(out)
    return u / u.norm(dim=-1, keepdim=True)


def layer_sum_spectrum(
    left: Factors,
    right: Factors,
    dtype: torch.dtype = torch.float32,
    method: str = "auto",
    finite: torch.Tensor | None = None,
) -> torch.Tensor:
    """Singular values of Σ_h A_h B_hᵀ for each layer: left, right (L, H, d, r) or L chunks (H, d, r)
    -> (L, min(d, H·r)), descending.

    Σ_h A_h B_hᵀ = A_cat B_catᵀ with A_cat = [A_1 … A_H] (d, H·r) (docs/methods.md §1, "per-layer
    product"). Layers are processed one at a time. method:
      "core": QR of A_cat, B_cat and singular values of the (H·r)² core (exact, cheap when H·r < d);
      "gram": square roots of the eigenvalues of M Mᵀ, M = A_cat B_catᵀ (d×d), in `dtype`; about 3×
              faster than a dense SVD, absolute error ≈ ε·s₁²/s_i on small singular values;
      "svd":  dense `torch.linalg.svdvals(M)` in `dtype`;
      "auto": "core" when H·r < d, else "gram".
    Non-finite layers give NaN rows, never an exception; `finite` (L,) may pass the per-layer
    finiteness when already known (else one summation pass per factor decides it).
    """
    rows = []
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(left, right, strict=True)):
            H, d, r = a.shape
            k = min(d, H * r)
            if finite is not None:
                ok = bool(finite[i])
            else:  # a NaN or inf entry makes the float64 sum non-finite
                ok = bool(torch.isfinite(a.detach().double().sum() + b.detach().double().sum()))
            if not ok:
                rows.append(torch.full((k,), float("nan"), dtype=dtype, device=a.device))
                continue
            how = ("core" if H * r < d else "gram") if method == "auto" else method
            if how == "core":
                A = a.detach().double().permute(1, 0, 2).reshape(d, H * r)
                B = b.detach().double().permute(1, 0, 2).reshape(d, H * r)
                s = torch.linalg.svdvals(triangular_factor(A, "qr") @ triangular_factor(B, "qr").mT)
            elif how in ("gram", "svd"):
                A = a.detach().to(dtype).permute(1, 0, 2).reshape(d, H * r)
                B = b.detach().to(dtype).permute(1, 0, 2).reshape(d, H * r)
                M = A @ B.mT  # (d, d)
                if how == "gram":
                    s = torch.linalg.eigvalsh(M @ M.mT).clamp_min(0).sqrt().flip(-1)
                else:
                    s = torch.linalg.svdvals(M)
            else:
                raise ValueError(f"method={method!r}; allowed: 'auto', 'core', 'gram', 'svd'")
            rows.append(s[:k].to(dtype))
    return torch.stack(rows)


def normalised_eigs(sv: torch.Tensor, d: int, sigma2_left: torch.Tensor, sigma2_right: torch.Tensor) -> torch.Tensor:
    """Normalised ESD λ_i = s_i² / (d² σ_A² σ_B²) of A Bᵀ, float64 (docs/methods.md §5).

    s_i are the singular values of A Bᵀ (WeightWatcher's convention λ = s², docs/methods.md §6) and
    σ_A², σ_B² the per-entry variances of the factors; for independent Gaussian factors the mean
    nonzero eigenvalue of (A Bᵀ)(A Bᵀ)ᵀ is d² σ_A² σ_B², so the null ESD has mean 1 and upper
    edge `rmt.product_edge(r/d)`.
    """
    return sv.double() ** 2 / ((d * d) * (sigma2_left * sigma2_right).double())[..., None]
