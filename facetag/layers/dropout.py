"""Dropout: zero each element with probability p in training, scale the rest by 1/(1 - p)."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class DropoutFn(torch.autograd.Function):
    """x (any shape) -> y = x * mask, mask[i] = bernoulli(1 - p) / (1 - p); 0 < p < 1."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, inplace: bool) -> Tensor:
        # NOTE: torch's CPU dropout draws exactly this, empty_like(x).bernoulli_(1 - p) then
        # div_(1 - p), from the default generator; doing the same keeps the mask identical to
        # F.dropout's for the same seed on CPU (CUDA uses a fused kernel with its own draws).
        mask = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)  # same shape as x
        ctx.save_for_backward(mask)
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(mask)
        return x * mask

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        grad_x = grad_out * mask if ctx.needs_input_grad[0] else None  # y is linear in x
        return grad_x, None, None


class DropAllFn(torch.autograd.Function):
    """x -> zeros (p == 1): every element dropped, so the gradient is zero too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:
        # torch multiplies by a zero scalar (so NaN and inf inputs give NaN, as here).
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(0.0)
        return x * 0.0

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_x = grad_out * 0.0 if ctx.needs_input_grad[0] else None
        return grad_x, None


def dropout(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """F.dropout: in training, zero each element with probability p and scale by 1/(1 - p).

    x (any shape) -> same shape. In eval mode, with p == 0 or an empty x, x itself is
    returned (no copy, as torch does).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: expected 0 <= p <= 1, got p={p}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0:
        return cast(Tensor, DropAllFn.apply(x, inplace))
    return cast(Tensor, DropoutFn.apply(x, p, inplace))


class Dropout(nn.Module):
    """nn.Dropout with our backward; active only in training mode."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: expected 0 <= p <= 1, got p={p}")
        self.p = p
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


FUNCTIONS = (DropoutFn, DropAllFn)
