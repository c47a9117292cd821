"""RMSNorm (Zhang & Sennrich 2019), as used pre-attention, pre-MLP and on MLA's latents."""

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """y = x̂ * g with x̂ = x * r, r = 1/sqrt(mean(x^2) + eps), and its backward written out.

    With u = dy * g (per row of width C):
        dx = r * (u - x̂ * mean(u * x̂)),   dg = sum over rows of dy * x̂.
    On CPU, F.rms_norm is a composite op whose autograd replays each of its elementwise steps;
    written out it is 9 passes over the activation, and forward+backward of the default run's
    (32, 128, 128) activation takes 1.26 ms instead of 1.72 ms (scripts/bench_rmsnorm.py, 2 threads).
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
        dx = torch.addcmul(u, x_hat, mean_u_xhat, value=-1).mul_(rstd)
        dweight = (dy * x_hat).flatten(0, -2).sum(0)  # (C,)
        return dx, dweight, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, with a learnable gain g initialised to 1.

    CUDA uses PyTorch's fused F.rms_norm kernel; CPU uses the hand-written backward above.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype:
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
