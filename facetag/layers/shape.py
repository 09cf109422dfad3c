"""Shape ops: flatten a range of dimensions into one."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class FlattenFn(torch.autograd.Function):
    """x (d_0, ..., d_k) -> y with dims start_dim..end_dim merged into their product."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, start_dim: int, end_dim: int) -> Tensor:
        ctx.x_shape = x.shape
        merged = math.prod(x.shape[start_dim : end_dim + 1])
        shape = (*x.shape[:start_dim], merged, *x.shape[end_dim + 1 :])  # e.g. (N, C*H*W)
        # NOTE: like torch.flatten, y is a view of x when the strides allow (contiguous x)
        # and a copy otherwise (channels_last x: the copy is in (N, C, H, W) order). Unlike
        # torch's, autograd forbids in-place ops on a view returned by a custom Function.
        return x.reshape(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # Flattening only renames elements, so the gradient is un-flattened the same way.
        grad_x = grad_out.reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def flatten(x: Tensor, start_dim: int = 1, end_dim: int = -1) -> Tensor:
    """torch.flatten: merge dims start_dim..end_dim (negative counts from the end).

    e.g. x (N, C, H, W) -> (N, C*H*W) with the defaults. A 0-d x becomes (1,). The result
    is a view of x when the strides allow; modifying it in place (e.g. relu_) while x
    requires grad raises, so clone it first if you must.
    """
    ndim = max(x.ndim, 1)  # torch treats a scalar as one dimension of size 1 here
    if not (-ndim <= start_dim < ndim and -ndim <= end_dim < ndim):
        raise ValueError(
            f"flatten: expected start_dim and end_dim in [{-ndim}, {ndim - 1}] for x of shape "
            f"{tuple(x.shape)}, got start_dim={start_dim}, end_dim={end_dim}"
        )
    start, end = start_dim % ndim, end_dim % ndim
    if start > end:
        raise ValueError(
            f"flatten: expected start_dim <= end_dim, got start_dim={start_dim} and "
            f"end_dim={end_dim} for x of shape {tuple(x.shape)}"
        )
    if x.ndim == 0:
        return cast(Tensor, FlattenFn.apply(x, 0, -1))
    return cast(Tensor, FlattenFn.apply(x, start, end))


class Flatten(nn.Module):
    """nn.Flatten: (N, C, H, W) -> (N, C*H*W) with the defaults."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x: Tensor) -> Tensor:
        return flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


FUNCTIONS = (FlattenFn,)
