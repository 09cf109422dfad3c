"""Pooling: max pooling, average pooling and global average pooling.

All three take x of shape (N, C, H, W). With K the kernel size, S the stride, P the padding
and D the dilation (per spatial dimension), the output size follows torch:

    H_out = (H + 2*P - D*(K - 1) - 1) // S + 1                       (ceil_mode=False)
    H_out = ceil((H + 2*P - D*(K - 1) - 1) / S) + 1, minus one if the
            last window would start in the right padding ((H_out - 1)*S >= H + P)  (ceil_mode=True)
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from facetag.layers._util import IntPair, memory_format, pair


def pool_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    """torch's pooling output size along one dimension (see the module docstring)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # windows that would start in the right padding are dropped
    return out


def _check_pool_args(
    op: str,
    x: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None,
    padding: IntPair,
    dilation: IntPair,
    ceil_mode: bool,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate pooling arguments like torch; returns K, S, P, D and (H_out, W_out)."""
    if x.ndim != 4:
        raise ValueError(f"{op}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    K = pair(kernel_size, op, "kernel_size")
    S = K if stride is None else pair(stride, op, "stride")
    P = pair(padding, op, "padding")
    D = pair(dilation, op, "dilation")
    if min(K) <= 0 or min(S) <= 0 or min(D) <= 0:
        raise ValueError(
            f"{op}: expected kernel_size, stride and dilation > 0, got kernel_size={K}, "
            f"stride={S}, dilation={D}"
        )
    if min(P) < 0 or P[0] > K[0] // 2 or P[1] > K[1] // 2:
        raise ValueError(
            f"{op}: expected 0 <= padding <= kernel_size // 2, got padding={P} for "
            f"kernel_size={K}; use a smaller padding"
        )
    H, W = x.shape[2], x.shape[3]
    out = (
        pool_output_size(H, K[0], S[0], P[0], D[0], ceil_mode),
        pool_output_size(W, K[1], S[1], P[1], D[1], ceil_mode),
    )
    if min(out) < 1:
        raise ValueError(
            f"{op}: expected an output of at least 1x1, got {out[0]}x{out[1]} for x of shape "
            f"{tuple(x.shape)} with kernel_size={K}, stride={S}, padding={P}, dilation={D}; "
            "use a larger input or a smaller kernel"
        )
    return K, S, P, D, out


def max_pool_no_argmax(
    x: Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    ceil_mode: bool,
    scratch: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Max pooling (dilation 1) without indices: x (N, C, H, W) -> (N, C, H_out, W_out),
    in x's memory format.

    The window max is separable: y[i, j] = max over u < KH of (max over v < KW of
    x_pad[i*SH + u, j*SW + v]), so a pass along H (KH - 1 elementwise maxima of strided
    views) then one along W (KW - 1) give it; padding counts as -inf, as in torch, and the
    right/bottom windows that ceil_mode keeps are clipped to x. NaN propagates as in
    F.max_pool2d. Speed: on the CPU, F.max_pool2d in NCHW always computes the argmax too
    (max_pool2d_with_indices) and took 65 ms for a 64x32x96x96 2x2 batch where this takes
    3-8 (experiments/LOG.md); inference needs no argmax.

    ``scratch``: x is a temporary nobody reads afterwards (a convolution's output inside
    ConvPoolAct). Where the windows along H do not overlap (KH <= SH), the H pass then
    writes each window's maximum into its first row of x instead of a new tensor: no
    allocation (and no page faults) for the largest intermediate, and one read of x.
    ``out``: where to write y (N, C, H_out, W_out), e.g. a slice of a larger batch.
    """
    H, W = x.shape[2], x.shape[3]
    (KH, KW), (SH, SW), (PH, PW) = kernel_size, stride, padding
    H_out = pool_output_size(H, KH, SH, PH, 1, ceil_mode)
    W_out = pool_output_size(W, KW, SW, PW, 1, ceil_mode)
    layout = memory_format(x)
    if PH or PW:  # rare (the networks here pool unpadded): pad, and the copy is ours
        x, scratch = F.pad(x, (PW, PW, PH, PH), value=float("-inf")), True
    rows = _max_along(x, 2, KH, SH, H_out, in_place=scratch and KH <= SH, layout=layout)
    return _max_along(rows, 3, KW, SW, W_out, in_place=False, layout=layout, out=out)


def _max_along(
    t: Tensor,
    dim: int,
    K: int,
    S: int,
    n: int,
    in_place: bool,
    layout: torch.memory_format,
    out: Tensor | None = None,
) -> Tensor:
    """The n window maxima of t along ``dim`` (2 or 3): window j covers [j*S, j*S + K),
    clipped to t (ceil_mode's last windows). in_place: written into each window's first
    element of t (needs K <= S, so that no window reads an element already written)."""
    size = t.shape[dim]
    full = min(n, (size - K) // S + 1) if size >= K else 0  # windows that fit whole

    def taps(v: int, first: int, count: int) -> Tensor:  # element v of windows first..
        index: list[slice] = [slice(None)] * 4
        index[dim] = slice(first * S + v, (first + count - 1) * S + v + 1, S)
        return t[tuple(index)]

    if in_place:
        out = taps(0, 0, n)  # each window's first element
    elif out is None:
        shape = list(t.shape)
        shape[dim] = n
        out = torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=layout)
    head = out.narrow(dim, 0, full)
    if full and K == 1 and not in_place:
        head.copy_(taps(0, 0, full))
    elif full and K > 1:
        torch.maximum(taps(0, 0, full), taps(1, 0, full), out=head)
        for v in range(2, K):
            torch.maximum(head, taps(v, 0, full), out=head)
    for j in range(full, n):  # clipped windows: at most ceil((K - 1) / S) of them
        cell = out.narrow(dim, j, 1)
        if not in_place:
            cell.copy_(t.narrow(dim, j * S, 1))
        for v in range(1, min(K, size - j * S)):
            torch.maximum(cell, t.narrow(dim, j * S + v, 1), out=cell)
    return out


class MaxPool2dFn(torch.autograd.Function):
    """x (N, C, H, W) -> y (N, C, H_out, W_out), and the argmax indices if asked for.

    The indices are torch's: for every output, the flat position h*W + w of the window's
    maximum in its (n, c) plane (the first one in row-major window order on ties).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
        return_indices: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        ctx.x_shape = tuple(x.shape)
        ctx.args = (kernel_size, stride, padding, dilation)
        if not ctx.needs_input_grad[0] and not return_indices:
            if dilation == (1, 1):  # inference: no argmax, 3-8x faster on the CPU
                return max_pool_no_argmax(x, kernel_size, stride, padding, ceil_mode)
            return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
        y, idx = F.max_pool2d(
            x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True
        )  # (N, C, H_out, W_out) each, in x's layout
        ctx.save_for_backward(idx)
        if return_indices:
            ctx.mark_non_differentiable(idx)
            return y, idx
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        # y[n, c, o] = x[n, c, idx[n, c, o]], so dL/dx[n, c, i] sums grad_out[n, c, o] over
        # the outputs o whose argmax is i: grad_out scattered (and added) to the argmax.
        (idx,) = ctx.saved_tensors
        N, C, H, W = ctx.x_shape
        (KH, KW), (SH, SW), padding, (DH, DW) = ctx.args
        span = (DH * (KH - 1) + 1, DW * (KW - 1) + 1)  # the dilated window
        if span[0] <= SH and span[1] <= SW:
            # Windows do not overlap, so each input is the argmax of at most one output and
            # the scatter needs no accumulation: grad_x[n, c, idx[n, c, o]] = grad_out[n, c, o],
            # zero elsewhere. NOTE: F.max_unpool2d is exactly that scatter (a plain indexed
            # write, no pooling maths), and it walks channels_last memory in order, where
            # Tensor.scatter_ along H*W strides by C and made MaxPool2d 8-34% slower.
            return (
                F.max_unpool2d(grad_out, idx, span, (SH, SW), padding, output_size=(H, W)),
                *(None,) * 6,
            )  # (N, C, H, W), in grad_out's layout
        layout = (
            torch.channels_last
            if not idx.is_contiguous() and idx.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        grad_x = torch.empty(
            (N, C, H, W), dtype=grad_out.dtype, device=grad_out.device, memory_format=layout
        ).zero_()
        # view, not flatten: (N, C, H*W) is a view in both layouts (an error, never a silent
        # copy, otherwise), so the scatter writes into grad_x itself.
        grad_x.view(N, C, H * W).scatter_add_(2, idx.flatten(2), grad_out.flatten(2))
        return grad_x, None, None, None, None, None, None


def max_pool2d(
    x: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Max over K x K windows, as F.max_pool2d (padding counts as -inf).

    x (N, C, H, W) -> y (N, C, H_out, W_out) (H_out in the module docstring); with
    return_indices, also the int64 argmax indices (N, C, H_out, W_out) of F.max_pool2d.
    stride defaults to kernel_size.
    """
    K, S, P, D, _ = _check_pool_args(
        "max_pool2d", x, kernel_size, stride, padding, dilation, ceil_mode
    )
    return cast(
        Tensor | tuple[Tensor, Tensor], MaxPool2dFn.apply(x, K, S, P, D, ceil_mode, return_indices)
    )


class MaxPool2d(nn.Module):
    """nn.MaxPool2d with our backward; same constructor and defaults."""

    def __init__(
        self,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return max_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
            self.return_indices,
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}"
        )


def _window_sizes(
    size: int,
    out: int,
    kernel: int,
    stride: int,
    padding: int,
    count_include_pad: bool,
    device: torch.device,
) -> Tensor:
    """Elements each window along one dimension averages over, as torch counts them.

    (out,). Windows are clipped to the padded input [-padding, size + padding); without
    count_include_pad, to the input itself [0, size).
    """
    start = torch.arange(out, device=device) * stride - padding  # (out,)
    end = torch.clamp(start + kernel, max=size + padding)
    if not count_include_pad:
        start = start.clamp(min=0)
        end = end.clamp(max=size)
    return end - start


def _repeat_blocks(grad: Tensor, KH: int, KW: int) -> Tensor:
    """Each value copied to a KH x KW block: (N, C, H, W) -> (N, C, H*KH, W*KW).

    The copy is written in grad's own layout (contiguous or channels_last).
    """
    N, C, H, W = grad.shape
    if not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last):
        hwc = grad.permute(0, 2, 3, 1)[:, :, None, :, None, :]  # (N, H, 1, W, 1, C)
        blocks = hwc.expand(N, H, KH, W, KW, C).reshape(N, H * KH, W * KW, C)
        return blocks.permute(0, 3, 1, 2)  # (N, C, H*KH, W*KW), channels_last
    blocks = grad[:, :, :, None, :, None].expand(N, C, H, KH, W, KW)
    return blocks.reshape(N, C, H * KH, W * KW)


class AvgPool2dFn(torch.autograd.Function):
    """x (N, C, H, W) -> y (N, C, H_out, W_out), the mean of each window."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        ceil_mode: bool,
        count_include_pad: bool,
        divisor_override: int | None,
    ) -> Tensor:
        ctx.x_shape = tuple(x.shape)
        ctx.args = (kernel_size, stride, padding, count_include_pad, divisor_override)
        return F.avg_pool2d(
            x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        )

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # y[o] = sum_{i in window o} x[i] / divisor[o], so dL/dx[i] = sum over the windows
        # o holding i of grad_out[o] / divisor[o]: divide, then spread each value back over
        # its K x K window (col2im, i.e. fold, of the value repeated K*K times); fold drops
        # the window parts that lie in the padding.
        N, C, H, W = ctx.x_shape
        (KH, KW), (SH, SW), (PH, PW), count_include_pad, divisor_override = ctx.args
        H_out, W_out = grad_out.shape[2], grad_out.shape[3]
        if divisor_override is not None:
            grad_window = grad_out / divisor_override
        else:
            rows = _window_sizes(H, H_out, KH, SH, PH, count_include_pad, grad_out.device)
            cols = _window_sizes(W, W_out, KW, SW, PW, count_include_pad, grad_out.device)
            divisor = (rows[:, None] * cols[None, :]).to(grad_out.dtype)  # (H_out, W_out)
            grad_window = grad_out / divisor  # (N, C, H_out, W_out)
        if (KH, KW) == (SH, SW) and (PH, PW) == (0, 0):
            # Windows tile the input: each value is copied to its K x K block (one pass).
            grad_x = _repeat_blocks(grad_window, KH, KW)  # (N, C, H_out*KH, W_out*KW)
            H_fold, W_fold = H_out * KH, W_out * KW
        else:
            # fold wants exactly its own floor-mode window count; a ceil_mode extra window
            # needs a taller canvas, whose rows past H are then cropped.
            H_fold = (
                H
                if pool_output_size(H, KH, SH, PH, 1, False) == H_out
                else ((H_out - 1) * SH + KH - 2 * PH)
            )
            W_fold = (
                W
                if pool_output_size(W, KW, SW, PW, 1, False) == W_out
                else ((W_out - 1) * SW + KW - 2 * PW)
            )
            L = H_out * W_out
            columns = grad_window.reshape(N, C, 1, L).expand(N, C, KH * KW, L)
            grad_x = F.fold(
                columns.reshape(N, C * KH * KW, L),  # (N, C*K*K, L)
                (H_fold, W_fold),
                (KH, KW),
                padding=(PH, PW),
                stride=(SH, SW),
            )  # (N, C, H_fold, W_fold)
        if (H_fold, W_fold) != (H, W):
            # Crop rows past the input (ceil_mode) or zero-fill rows no window reached.
            grad_x = F.pad(grad_x, (0, W - W_fold, 0, H - H_fold))  # (N, C, H, W)
        return grad_x, None, None, None, None, None, None


def avg_pool2d(
    x: Tensor,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Tensor:
    """Mean over K x K windows, as F.avg_pool2d.

    x (N, C, H, W) -> y (N, C, H_out, W_out) (H_out in the module docstring, D = 1). The
    divisor is divisor_override if given, else the window size clipped to the padded input
    (count_include_pad) or to the input itself.
    """
    K, S, P, _, _ = _check_pool_args("avg_pool2d", x, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None and (
        not isinstance(divisor_override, int) or divisor_override == 0
    ):
        raise ValueError(
            f"avg_pool2d: expected divisor_override to be a non-zero int or None, "
            f"got {divisor_override!r}"
        )
    return cast(
        Tensor, AvgPool2dFn.apply(x, K, S, P, ceil_mode, count_include_pad, divisor_override)
    )


class AvgPool2d(nn.Module):
    """nn.AvgPool2d with our backward; same constructor and defaults."""

    def __init__(
        self,
        kernel_size: IntPair,
        stride: IntPair | None = None,
        padding: IntPair = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool2dFn(torch.autograd.Function):
    """x (N, C, H, W) -> y (N, C), the mean over all H*W positions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.x_shape = tuple(x.shape)
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last
        )
        return x.mean(dim=(2, 3))  # (N, C)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None]:
        # Every position contributes 1/(H*W) of its channel's mean.
        N, C, H, W = ctx.x_shape
        grad_x = (grad_out / (H * W))[:, :, None, None].expand(N, C, H, W)  # (N, C, H, W)
        # Materialise in x's layout: a stride-0 gradient would surprise the op before us.
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return (grad_x.contiguous(memory_format=layout),)


def global_avg_pool2d(x: Tensor) -> Tensor:
    """Mean over the spatial dimensions: x (N, C, H, W) -> (N, C).

    Same as nn.AdaptiveAvgPool2d(1) followed by flattening.
    """
    if x.ndim != 4:
        raise ValueError(
            f"global_avg_pool2d: expected x of shape (N, C, H, W), got {tuple(x.shape)}"
        )
    return cast(Tensor, GlobalAvgPool2dFn.apply(x))


class GlobalAvgPool2d(nn.Module):
    """(N, C, H, W) -> (N, C): the spatial mean of every channel."""

    def forward(self, x: Tensor) -> Tensor:
        return global_avg_pool2d(x)


FUNCTIONS = (MaxPool2dFn, AvgPool2dFn, GlobalAvgPool2dFn)
