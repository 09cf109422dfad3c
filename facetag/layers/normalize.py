"""L2 normalisation along one dimension (embeddings onto the unit sphere)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class L2NormalizeFn(torch.autograd.Function):
    """x (..., D, ...) -> y = x / max(||x||_2, eps), the norm taken along dim."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, eps: float) -> Tensor:
        norm = x.norm(2, dim, keepdim=True)  # (..., 1, ...), the same call F.normalize makes
        y: Tensor = x / norm.clamp_min(eps).expand_as(x)
        ctx.dim, ctx.eps = dim, eps
        ctx.save_for_backward(y, norm)  # the derivative is simplest in terms of y
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # With n = ||x|| > eps, y = x / n and dy_i/dx_j = (delta_ij - y_i y_j) / n, so
        # grad_x = (g - y * <y, g>) / n: the part of g orthogonal to y, over the norm. Below
        # eps the divisor is the constant eps, so grad_x = g / eps. As torch's clamp_min
        # (whose gradient is 0 at the bound), n == eps takes the constant branch.
        y, norm = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        radial = (y * grad_out).sum(ctx.dim, keepdim=True)  # (..., 1, ...)
        radial = torch.where(norm > ctx.eps, radial, 0.0)
        grad_x = (grad_out - y * radial) / norm.clamp_min(ctx.eps)  # same shape as x
        return grad_x, None, None


def l2_normalize(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """F.normalize(x, p=2, dim=dim, eps=eps): x / max(||x||_2 along dim, eps).

    x (N, D) -> (N, D) with unit rows for the defaults; any shape works, dim may be negative.
    """
    if x.ndim == 0 or not -x.ndim <= dim < x.ndim:
        raise ValueError(
            f"l2_normalize: expected dim in [{-max(x.ndim, 1)}, {max(x.ndim, 1) - 1}] for x of "
            f"shape {tuple(x.shape)}, got dim={dim}"
        )
    if eps < 0:
        raise ValueError(f"l2_normalize: expected eps >= 0, got eps={eps}")
    return cast(Tensor, L2NormalizeFn.apply(x, dim % x.ndim, eps))


class L2Norm(nn.Module):
    """Scale each slice along dim to unit L2 norm: (N, D) -> (N, D) for embeddings."""

    def __init__(self, dim: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return l2_normalize(x, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


FUNCTIONS = (L2NormalizeFn,)
