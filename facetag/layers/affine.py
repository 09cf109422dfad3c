"""Per-channel affine: y[n, c, h, w] = x[n, c, h, w] * gamma[c] + beta[c].

The form a batch norm takes once its statistics are fixed (dlib's ``affine`` layer, which
its face network uses in place of batch norm), and the tail of batch norm itself.
"""

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class ChannelAffineFn(torch.autograd.Function):
    """x (N, C, H, W), gamma (C,), beta (C,) -> y (N, C, H, W)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        ctx.save_for_backward(x, gamma)  # beta is not needed: dy/dbeta == 1
        return x * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, gamma = ctx.saved_tensors
        grad_x = grad_gamma = grad_beta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out * gamma.view(1, -1, 1, 1)  # (N, C, H, W)
        if ctx.needs_input_grad[1]:
            grad_gamma = (grad_out * x).sum(dim=(0, 2, 3))  # (C,)
        if ctx.needs_input_grad[2]:
            grad_beta = grad_out.sum(dim=(0, 2, 3))  # (C,)
        return grad_x, grad_gamma, grad_beta


def channel_affine(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """x * gamma[c] + beta[c] for every channel c.

    x (N, C, H, W), gamma (C,), beta (C,) -> y (N, C, H, W).
    """
    if x.ndim != 4:
        raise ValueError(f"channel_affine: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    C = x.shape[1]
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(
            f"channel_affine: gamma and beta must have shape ({C},) to match x, "
            f"got {tuple(gamma.shape)} and {tuple(beta.shape)}"
        )
    return cast(Tensor, ChannelAffineFn.apply(x, gamma, beta))  # .apply is untyped


class ChannelAffine(nn.Module):
    """A learnt per-channel scale gamma (ones) and shift beta (zeros): (N, C, H, W) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return channel_affine(x, self.gamma, self.beta)

    def extra_repr(self) -> str:
        return f"channels={self.gamma.numel()}"


FUNCTIONS = (ChannelAffineFn,)
