"""RMSNorm's and RoPE's written-out backwards against autograd of their formulas; RoPE's rotation properties."""

import pytest
import torch
import torch.nn.functional as F

from models.gpt import RMSNorm, RotaryEmbedding


@pytest.mark.parametrize("shape", [(2, 5, 16), (3, 4, 7, 8)])
def test_rmsnorm_matches_autograd_of_the_formula(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    ours = norm(x)
    ours.backward(dy)
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    ref.backward(dy)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, norm.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (shape[-1],), norm.weight, 1e-6))


def test_rmsnorm_gradcheck() -> None:
    norm = RMSNorm(6).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = norm.weight.detach().clone().uniform_(0.5, 1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), (x, w))


@pytest.mark.parametrize("shape", [(2, 3, 5, 8), (4, 7, 16)])
def test_rope_backward_matches_autograd_of_the_textbook_formula(shape: tuple[int, ...]) -> None:
    """The eager path (written-out backward) against x1 cos - x2 sin, x2 cos + x1 sin through autograd, from start 3."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(shape[-1], max_len=16).double()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    ours = rope(x, start=3)
    ours.backward(dy)
    gx, x.grad = x.grad.clone(), None
    T, half = shape[-2], shape[-1] // 2
    cos, sin = rope.cos[3 : 3 + T, :half], rope.sin[3 : 3 + T, :half]
    x1, x2 = x[..., :half], x[..., half:]
    ref = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    ref.backward(dy)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, x.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: rope(x, start=3), (x.detach().requires_grad_(),))


def test_rope_preserves_norms_and_relative_positions() -> None:
    """A rotation: |R_t x| = |x|, and <R_s q, R_t k> depends only on t - s."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, max_len=32).double()  # tables computed in fp32: a rotation to ~1e-7
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rq = rope(q.expand(32, 16).contiguous())  # (32, 16): q at every position
    rk = rope(k.expand(32, 16).contiguous())
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(32), rtol=1e-6, atol=0)
    torch.testing.assert_close(rq[2] @ rk[7], rq[20] @ rk[25], rtol=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(rope, (torch.randn(4, 16, dtype=torch.float64, requires_grad=True),))
