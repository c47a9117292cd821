"""Elementwise ops of the model with their backwards written out: fewer passes over the activation on CPU
than autograd replaying the formula (scripts/bench_rmsnorm.py, scripts/bench_train.py measure them). Each is
tested against autograd of its formula and with gradcheck (tests/test_model_kernels.py)."""

import torch


class RMSNormFunction(torch.autograd.Function):
    """y = x̂ * g with x̂ = x * r, r = 1/sqrt(mean(x^2) + eps), and its backward written out.

    With u = dy * g (per row of width C):
        dx = r * (u - x̂ * mean(u * x̂)),   dg = sum over rows of dy * x̂.
    On CPU, F.rms_norm is a composite op whose autograd replays each of its elementwise steps;
    written out it is fewer passes over the activation (scripts/bench_rmsnorm.py measures both).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                eps: float) -> torch.Tensor:
        C = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(C).add_(eps).rsqrt_()  # (..., 1)
        x_hat = x * rstd  # (..., C)
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x_hat, weight, rstd = ctx.saved_tensors
        u = dy * weight  # (..., C)
        mean_u_xhat = torch.linalg.vecdot(u, x_hat).unsqueeze_(-1).div_(x_hat.shape[-1])  # (..., 1)
        dx = u.addcmul_(x_hat, mean_u_xhat, value=-1).mul_(rstd)
        dweight = (dy * x_hat).flatten(0, -2).sum(0)  # (C,)
        return dx, dweight, None


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] along the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """R_t x_t for x (..., T, dim), rotate-half convention: with x = [x1, x2] and angles θ_t,
    R_t x = [x1 cos θ - x2 sin θ, x2 cos θ + x1 sin θ] = x * cos + swap_halves(x) * sin_signed, where the
    tables are cos = [cos θ, cos θ] and sin_signed = [-sin θ, sin θ], each (T, dim)."""
    return swap_halves(x).mul_(sin_signed).addcmul_(x, cos)


class RotaryFunction(torch.autograd.Function):
    """`rotate` with its backward written out. R_t is orthogonal, so dx = R_tᵀ dy, the same formula with
    -sin_signed. Autograd of the formula instead replays the split, concatenation and products and sums
    three partial gradients of x; on CPU that was 11% of a tiny model's training step (scripts/bench_train.py)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, cos: torch.Tensor,
                sin_signed: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin_signed.neg())  # (T, dim) tables: R_tᵀ rotates by -θ_t
        return rotate(x, cos, sin_signed)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, minus_sin_signed = ctx.saved_tensors
        return rotate(dy, cos, minus_sin_signed), None, None
