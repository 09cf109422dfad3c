"""Gradient checks for conv2d and its two gradient functions, conv2d_grad_x/_weight.

conv2d cases cover batch 1, odd sizes, stride with a remainder the stride skips, padding,
dilation, rectangular kernels, groups (depthwise and channel multipliers), no bias, a
kernel as large as the input, 1x1, an input that needs no gradient, and channels_last and
strided inputs. The gradient functions are also checked alone against torch.nn.grad (every
grad_weight method: torch's kernel, whose float64 finite-difference check is the
independent one, im2col, the swapped convolution and Winograd where it applies; both
memory formats of grad_out and x), since the fused ops (conv + affine) call them directly.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import grad as torch_grad

from facetag.gradcheck.core import OpCase
from facetag.layers.conv import conv2d, conv2d_grad_weight, conv2d_grad_x
from facetag.layers.conv_fast import winograd_applies

Pair = tuple[int, int]
Conv = tuple[Pair, Pair, Pair, int]  # stride, padding, dilation, groups


def _layout(t: Tensor, layout: str) -> Tensor:
    """t in the given layout: "contiguous", "channels_last" or "strided" (every other column)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _conv_inputs(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    bias: bool,
    layout: str,
    x_grad: bool,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, ...]:
    x = _layout(torch.randn(x_shape, generator=g, dtype=dtype), layout)
    w = torch.randn(w_shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)  # as Module.to(channels_last) does
    out: tuple[Tensor, ...] = (x.requires_grad_(x_grad), w.requires_grad_())
    if bias:
        out += (torch.randn(w_shape[0], generator=g, dtype=dtype, requires_grad=True),)
    return out


def _conv_case(
    name: str,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    bias: bool = True,
    layout: str = "contiguous",
    x_grad: bool = True,
    big: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
) -> OpCase:
    """A conv2d case; `big` gives larger (x_shape, w_shape) for the float32 torch comparison."""
    kw: dict[str, Any] = {"stride": stride, "padding": padding, "dilation": dilation}
    kw["groups"] = groups
    small = partial(_conv_inputs, x_shape, w_shape, bias, layout, x_grad)
    return OpCase(
        "conv2d",
        name,
        ours=lambda *t: conv2d(*t, **kw),
        ref=lambda *t: F.conv2d(*t, **kw),
        make_inputs=partial(_conv_inputs, *big, bias, layout, x_grad) if big else small,
        make_gradcheck_inputs=small if big else None,
    )


def _pair(v: int | Pair) -> Pair:
    return (v, v) if isinstance(v, int) else v


def _grad_inputs(
    first: tuple[int, ...],
    second: tuple[int, ...],
    layout: str,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    a = _layout(torch.randn(first, generator=g, dtype=dtype), layout)
    b = _layout(torch.randn(second, generator=g, dtype=dtype), layout)
    return a.requires_grad_(), b.requires_grad_()


def _grad_cases(
    name: str,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    layout: str = "contiguous",
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    dilation: int | Pair = 1,
    groups: int = 1,
) -> list[OpCase]:
    """conv2d_grad_x (inputs grad_out, weight) and conv2d_grad_weight (grad_out, x) by method."""
    S, P, D = _pair(stride), _pair(padding), _pair(dilation)
    H_out = (x_shape[2] + 2 * P[0] - D[0] * (w_shape[2] - 1) - 1) // S[0] + 1
    W_out = (x_shape[3] + 2 * P[1] - D[1] * (w_shape[3] - 1) - 1) // S[1] + 1
    go_shape = (x_shape[0], w_shape[0], H_out, W_out)
    cases = [
        OpCase(
            "conv2d_grad_x",
            name,
            ours=lambda go, w: conv2d_grad_x(go, w, x_shape, S, P, D, groups),
            ref=lambda go, w: _torch_grad_x(go, w, x_shape, S, P, D, groups),
            make_inputs=partial(_grad_inputs, go_shape, w_shape, layout),
        )
    ]
    conv = (S, P, D, groups)
    methods = ["kernel", "im2col", "corr"]
    if winograd_applies(w_shape, S, D, groups):
        methods.append("winograd")
    for method in methods:
        cases.append(
            OpCase(
                "conv2d_grad_weight",
                f"{name}-{method}",
                ours=partial(_grad_weight, w_shape=w_shape, conv=conv, method=method),
                ref=partial(_torch_grad_weight, w_shape=w_shape, conv=conv),
                make_inputs=partial(_grad_inputs, go_shape, x_shape, layout),
            )
        )
    return cases


def _grad_weight(
    go: Tensor, x: Tensor, w_shape: tuple[int, ...], conv: Conv, method: str
) -> Tensor:
    return conv2d_grad_weight(go, x, w_shape, *conv, method=method)


def _torch_grad_weight(go: Tensor, x: Tensor, w_shape: tuple[int, ...], conv: Conv) -> Tensor:
    return cast(Tensor, torch_grad.conv2d_weight(x, w_shape, go, *conv))


def _torch_grad_x(
    go: Tensor, w: Tensor, x_shape: tuple[int, ...], S: Pair, P: Pair, D: Pair, groups: int
) -> Tensor:
    return cast(Tensor, torch_grad.conv2d_input(x_shape, w, go, S, P, D, groups))


# Gradcheck inputs stay small (the checkers build full Jacobians): <= ~150 input and
# output elements per case; `big` shapes are only used for the float32 torch comparison.
CASES: list[OpCase] = [
    _conv_case(
        "k3-pad1",
        (2, 2, 4, 3),
        (3, 2, 3, 3),
        padding=1,
        big=((4, 16, 12, 12), (32, 16, 3, 3)),
    ),
    _conv_case(
        "k3-pad1-channels_last",
        (1, 8, 3, 3),
        (1, 8, 3, 3),
        layout="channels_last",
        padding=1,
        big=((4, 16, 12, 12), (32, 16, 3, 3)),
    ),
    _conv_case("k3-channels_last-3ch", (1, 3, 4, 4), (2, 3, 3, 3), layout="channels_last"),
    _conv_case("batch1-odd", (1, 2, 5, 3), (2, 2, 3, 3)),
    _conv_case("strided-input", (2, 2, 4, 3), (2, 2, 3, 3), layout="strided", padding=1),
    _conv_case("stride2-remainder", (1, 2, 6, 5), (2, 2, 3, 3), stride=2, padding=1),
    _conv_case(
        "rect-stride-pad-dilation",
        (1, 2, 5, 6),
        (2, 2, 2, 3),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(2, 1),
    ),
    _conv_case("dilation2", (1, 2, 5, 5), (2, 2, 3, 3), dilation=2, padding=2),
    _conv_case("groups2", (1, 4, 4, 4), (4, 2, 3, 3), groups=2, padding=1),
    _conv_case("depthwise", (2, 3, 4, 3), (3, 1, 3, 3), groups=3, padding=1),
    _conv_case(
        "depthwise-multiplier-stride2", (1, 3, 5, 5), (6, 1, 3, 3), groups=3, stride=2, padding=1
    ),
    _conv_case("no-bias", (2, 2, 4, 3), (3, 2, 3, 3), bias=False, padding=1),
    _conv_case("kernel-equals-input", (2, 3, 3, 3), (2, 3, 3, 3)),
    _conv_case("1x1", (2, 4, 3, 3), (3, 4, 1, 1)),
    _conv_case("x-needs-no-grad", (2, 3, 4, 4), (2, 3, 3, 3), x_grad=False, padding=1),
    *_grad_cases("k3-pad1", (1, 2, 4, 4), (2, 2, 3, 3), padding=1),
    *_grad_cases("k3-channels_last", (1, 8, 3, 3), (1, 8, 3, 3), "channels_last", padding=1),
    *_grad_cases("stride2-remainder", (1, 2, 6, 5), (2, 2, 3, 3), stride=2, padding=1),
    *_grad_cases(
        "rect-dilation-groups",
        (1, 4, 5, 4),
        (4, 2, 2, 3),
        stride=(1, 2),
        padding=(2, 1),
        dilation=(2, 1),
        groups=2,
    ),
    *_grad_cases("depthwise", (1, 3, 4, 4), (3, 1, 3, 3), groups=3, padding=1),
    # Winograd tiles are 2x2 outputs: odd output sizes and other paddings pad the last tile
    *_grad_cases("k3-odd-out-pad0", (2, 2, 5, 6), (2, 2, 3, 3)),
    *_grad_cases("k3-pad2", (1, 3, 3, 4), (2, 3, 3, 3), padding=2),
]
