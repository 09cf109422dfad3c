"""A convolution followed by a per-channel affine, as one op (dlib's con -> affine pair).

    z = conv(x, W) + b                                    (facetag.layers.conv)
    y[n, f, i, j] = gamma[f] * z[n, f, i, j] + beta[f]    (facetag.layers.affine)

Forward: one convolution with the affine folded into the kernel,

    y = conv(x, gamma[f] * W[f]) + (gamma * b + beta),

so the affine costs no pass over the activations and z is never stored. Backward, with
g = dL/dy and G = corr(x, g) (G[f, c, u, v] = sum_{n, i, j} g[n, f, i, j] *
x_pad[n, c, i*S + u*D, j*S + v*D], the plain convolution's weight gradient):

    dL/dz     = gamma[f] * g
    grad_x    = conv_transpose(gamma * g, W) = conv_transpose(g, gamma[f] * W[f])
    grad_W    = corr(x, gamma * g)          = gamma[f] * G[f]
    grad_b    = gamma * sum_{n,i,j} g
    grad_beta = sum_{n,i,j} g
    grad_gamma[f] = sum_{n,i,j} g * z       = sum_{c,u,v} W[f] * G[f] + b[f] * grad_beta[f]

The last line: z is linear in W, so g's inner product with z is W's inner product with
G. Every gradient comes from the two products the plain convolution already computes
(grad_x and G) and (F,)-sized sums: the separate affine's two passes over z in the
backward, one in the forward and the saved z all go (the dlib ResNet's training step,
experiments/LOG.md).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from facetag.layers._util import IntPair, Pair, memory_format
from facetag.layers.conv import check_conv_args, conv2d_grad_weight, conv2d_grad_x


def _per_filter(v: Tensor, ndim: int) -> Tensor:
    """(F,) -> (F, 1, 1, 1): broadcast over a kernel's (C/groups, KH, KW)."""
    return v.view(-1, *([1] * (ndim - 1)))


class ConvAffineFn(torch.autograd.Function):
    """x (N, C, H, W), weight (F, C/groups, KH, KW), bias (F,) or None, gamma, beta (F,)
    -> y (N, F, H_out, W_out)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        gamma: Tensor,
        beta: Tensor,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        groups: int,
    ) -> Tensor:
        scaled = weight * _per_filter(gamma, weight.ndim)  # (F, C/groups, KH, KW)
        shift = beta if bias is None else torch.addcmul(beta, gamma, bias)  # (F,)
        ctx.save_for_backward(x, weight, bias, gamma)
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, scaled, shift, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, gamma = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b, need_gamma, need_beta = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_gamma = grad_beta = None
        if need_x:
            scaled = weight * _per_filter(gamma, weight.ndim)
            grad_x = conv2d_grad_x(
                grad_out, scaled, x.shape, stride, padding, dilation, groups, memory_format(x)
            )  # (N, C, H, W)
        g_sum = grad_out.sum((0, 2, 3)) if need_b or need_gamma or need_beta else None  # (F,)
        if need_w or need_gamma:
            G = conv2d_grad_weight(grad_out, x, weight.shape, stride, padding, dilation, groups)
            if need_w:
                grad_w = G * _per_filter(gamma, weight.ndim)  # (F, C/groups, KH, KW)
            if need_gamma:
                assert g_sum is not None
                grad_gamma = (G * weight).sum((1, 2, 3))  # (F,): sum of g * conv(x, W)
                if bias is not None:
                    grad_gamma += bias * g_sum
        if need_b:
            assert g_sum is not None
            grad_b = gamma * g_sum
        if need_beta:
            grad_beta = g_sum
        return grad_x, grad_w, grad_b, grad_gamma, grad_beta, None, None, None, None


def conv_affine(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor,
    beta: Tensor,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """channel_affine(conv2d(x, weight, bias, ...), gamma, beta) in one op (module doc).

    x (N, C, H, W), weight (F, C/groups, KH, KW), bias (F,) or None, gamma, beta (F,)
    -> y (N, F, H_out, W_out); the convolution's arguments are conv2d's.
    """
    S, P, D = check_conv_args("conv_affine", x, weight, bias, stride, padding, dilation, groups)
    F_ = weight.shape[0]
    if gamma.shape != (F_,) or beta.shape != (F_,):
        raise ValueError(
            f"conv_affine: expected gamma and beta of shape ({F_},) to match the {F_} "
            f"filters, got {tuple(gamma.shape)} and {tuple(beta.shape)}"
        )
    for t in (gamma, beta, *(() if bias is None else (bias,))):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"conv_affine: expected bias, gamma and beta on x's {x.dtype} {x.device}, "
                f"got {t.dtype} {t.device}; move the module with .to(x)"
            )
    return cast(Tensor, ConvAffineFn.apply(x, weight, bias, gamma, beta, S, P, D, groups))


FUNCTIONS = (ConvAffineFn,)
