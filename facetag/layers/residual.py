"""Residual additions: a plain sum of two tensors, and dlib's ``add_prev`` with zero padding.

add:          x, skip (N, C, H, W) -> y = x + skip (N, C, H, W)
zero_pad_add: x (N, C1, H1, W1), skip (N, C2, H2, W2) -> y (N, C, H, W) with
              C = max(C1, C2), H = max(H1, H2), W = max(W1, W2), and
              y = pad(x) + pad(skip), each zero-padded at the END of C, H and W.

zero_pad_add is exactly what dlib's add_prev layer computes (dlib/dnn/layers.h: the output
takes the larger size in every dimension; tt::add treats the elements one tensor lacks as
zero). dlib's face network relies on all three kinds of padding: a down-sampling block's
skip has fewer channels than its main path (its extra channels get nothing from the skip),
and where an unpadded stride-2 conv and a 2x2 average pool disagree about the size (an
8x8 input: the conv gives 3x3, the pool 4x4) the skip is the larger one, so the sum is
4x4 and its last row and column carry the skip alone.

The backward of a zero padding is a crop: grad_x is grad_out's top-left (C1, H1, W1)
corner, grad_skip its (C2, H2, W2) corner; with equal shapes both are grad_out itself.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

Shape4 = tuple[int, int, int, int]


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last when t is laid out (N, H, W, C) and not also plain contiguous."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_pair(op: str, x: Tensor, skip: Tensor) -> None:
    """Both 4-D, floating point, on one dtype and device, with the same batch size."""
    for name, t in (("x", x), ("skip", skip)):
        if t.ndim != 4:
            raise ValueError(f"{op}: expected {name} of shape (N, C, H, W), got {tuple(t.shape)}")
    if x.dtype != skip.dtype or x.device != skip.device:
        raise ValueError(
            f"{op}: expected skip on x's {x.dtype} {x.device}, got {skip.dtype} {skip.device}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{op}: expected floating-point tensors, got dtype {x.dtype}")
    if x.shape[0] != skip.shape[0]:
        raise ValueError(
            f"{op}: expected x and skip with the same batch size, got x of shape "
            f"{tuple(x.shape)} and skip of shape {tuple(skip.shape)}"
        )


class AddFn(torch.autograd.Function):
    """x (N, C, H, W), skip (N, C, H, W) -> y = x + skip (N, C, H, W)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, skip: Tensor) -> Tensor:
        return x + skip  # nothing to save: dy/dx = dy/dskip = 1

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # Both inputs pass grad_out through unchanged (neither side writes to it).
        grad_x = grad_out if ctx.needs_input_grad[0] else None
        grad_skip = grad_out if ctx.needs_input_grad[1] else None
        return grad_x, grad_skip


def add(x: Tensor, skip: Tensor) -> Tensor:
    """Residual sum y = x + skip of two tensors of one shape (N, C, H, W) -> (N, C, H, W)."""
    _check_pair("add", x, skip)
    if x.shape != skip.shape:
        raise ValueError(
            f"add: expected x and skip of the same shape, got {tuple(x.shape)} and "
            f"{tuple(skip.shape)}; use zero_pad_add to zero-pad the smaller one (dlib's add_prev)"
        )
    return cast(Tensor, AddFn.apply(x, skip))  # .apply is untyped


class Add(nn.Module):
    """(x, skip) -> x + skip, both (N, C, H, W)."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return add(x, skip)


def _crop(grad_out: Tensor, shape: Shape4, memory_format: torch.memory_format) -> Tensor:
    """grad_out's top-left (C, H, W) corner of ``shape``, in the input's memory format."""
    if tuple(grad_out.shape) == shape:
        return grad_out
    _, C, H, W = shape
    return grad_out[:, :C, :H, :W].contiguous(memory_format=memory_format)  # (N, C, H, W)


class ZeroPadAddFn(torch.autograd.Function):
    """x (N, C1, H1, W1), skip (N, C2, H2, W2) -> y (N, max C, max H, max W)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, skip: Tensor) -> Tensor:
        ctx.shapes = (tuple(x.shape), tuple(skip.shape))
        ctx.formats = (_memory_format(x), _memory_format(skip))
        N, C1, H1, W1 = x.shape
        _, C2, H2, W2 = skip.shape
        shape = (N, max(C1, C2), max(H1, H2), max(W1, W2))
        if x.shape == skip.shape:
            return x + skip  # (N, C, H, W)
        # Start from whichever input already has the output's size (a copy, then one
        # add into the other's corner); else from zeros. The output keeps x's layout.
        if tuple(x.shape) == shape:
            y = x.clone(memory_format=ctx.formats[0])  # (N, C, H, W)
            y[:, :C2, :H2, :W2] += skip
        elif tuple(skip.shape) == shape:
            y = skip.clone(memory_format=ctx.formats[0])  # (N, C, H, W)
            y[:, :C1, :H1, :W1] += x
        else:
            y = x.new_zeros(shape).contiguous(memory_format=ctx.formats[0])  # (N, C, H, W)
            y[:, :C1, :H1, :W1] = x
            y[:, :C2, :H2, :W2] += skip
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # y = pad(x) + pad(skip) and pad only adds zeros after the inputs' elements, so
        # dL/dx[n, c, h, w] = grad_out[n, c, h, w] for every index inside x: a crop.
        (x_shape, skip_shape), (x_format, skip_format) = ctx.shapes, ctx.formats
        grad_x = grad_skip = None
        if ctx.needs_input_grad[0]:
            grad_x = _crop(grad_out, x_shape, x_format)  # (N, C1, H1, W1)
        if ctx.needs_input_grad[1]:
            grad_skip = _crop(grad_out, skip_shape, skip_format)  # (N, C2, H2, W2)
        return grad_x, grad_skip


def zero_pad_add(x: Tensor, skip: Tensor) -> Tensor:
    """dlib's add_prev: the sum of x and skip, each zero-padded at the end to the larger size.

    x (N, C1, H1, W1), skip (N, C2, H2, W2) -> y (N, max(C1, C2), max(H1, H2), max(W1, W2)),
    y[n, c, h, w] = x[n, c, h, w] (0 outside x) + skip[n, c, h, w] (0 outside skip).
    With equal shapes it is ``add``. y is laid out like x (contiguous or channels_last).
    """
    _check_pair("zero_pad_add", x, skip)
    return cast(Tensor, ZeroPadAddFn.apply(x, skip))  # .apply is untyped


class ZeroPadAdd(nn.Module):
    """(x, skip) -> zero_pad_add(x, skip): dlib's add_prev layer."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return zero_pad_add(x, skip)


FUNCTIONS = (AddFn, ZeroPadAddFn)
