"""Gradient checks for the fused convolution + per-channel affine (dlib's con -> affine).

Against torch's F.conv2d followed by x * gamma + beta: with and without the conv's bias,
stride with a remainder, padding, dilation, groups, a 7x7 stride-2 stem, channels_last,
an input that needs no gradient, frozen parameters, and a gamma with a zero in it (its
filter then gets no gradient, and gamma's own gradient must still be the inner product
of W with the correlation).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.conv_affine import conv_affine


def _inputs(
    x_shape: tuple[int, int, int, int],
    w_shape: tuple[int, int, int, int],
    bias: bool,
    layout: str,
    x_grad: bool,
    zero_gamma: bool,
    frozen: tuple[str, ...],
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, ...]:
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    w = torch.randn(w_shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    F_ = w_shape[0]
    b = torch.randn(F_, generator=g, dtype=dtype) if bias else None
    gamma = torch.randn(F_, generator=g, dtype=dtype)
    if zero_gamma:
        gamma[0] = 0.0
    beta = torch.randn(F_, generator=g, dtype=dtype)
    out = [x.requires_grad_(x_grad), w.requires_grad_("w" not in frozen)]
    out += [] if b is None else [b.requires_grad_("b" not in frozen)]
    return (
        *out,
        gamma.requires_grad_("gamma" not in frozen),
        beta.requires_grad_("beta" not in frozen),
    )


def _split(
    t: tuple[Tensor, ...], bias: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    if bias:
        x, w, b, gamma, beta = t
        return x, w, b, gamma, beta
    x, w, gamma, beta = t
    return x, w, None, gamma, beta


def _ours(*t: Tensor, bias: bool, kw: dict[str, int]) -> Tensor:
    x, w, b, gamma, beta = _split(t, bias)
    return conv_affine(x, w, b, gamma, beta, **kw)


def _reference(*t: Tensor, bias: bool, kw: dict[str, int]) -> Tensor:
    x, w, b, gamma, beta = _split(t, bias)
    return F.conv2d(x, w, b, **kw) * gamma[:, None, None] + beta[:, None, None]


def _case(
    name: str,
    x_shape: tuple[int, int, int, int],
    w_shape: tuple[int, int, int, int],
    bias: bool = True,
    layout: str = "contiguous",
    x_grad: bool = True,
    zero_gamma: bool = False,
    frozen: tuple[str, ...] = (),
    **kw: int,
) -> OpCase:
    return OpCase(
        "conv_affine",
        name,
        ours=partial(_ours, bias=bias, kw=kw),
        ref=partial(_reference, bias=bias, kw=kw),
        make_inputs=partial(_inputs, x_shape, w_shape, bias, layout, x_grad, zero_gamma, frozen),
    )


CASES: list[OpCase] = [
    _case("3x3-pad", (2, 3, 6, 5), (4, 3, 3, 3), padding=1),
    _case("no-bias", (2, 3, 5, 5), (4, 3, 3, 3), bias=False, padding=1),
    _case("stride-2-remainder", (2, 2, 8, 7), (3, 2, 3, 3), stride=2),
    _case("stem-7x7-stride-2", (1, 3, 11, 11), (2, 3, 7, 7), stride=2),
    _case("groups", (2, 4, 5, 5), (6, 2, 3, 3), padding=1, groups=2),
    _case("channels-last", (2, 3, 5, 6), (4, 3, 3, 3), layout="channels_last", padding=1),
    _case("x-needs-no-grad", (2, 3, 5, 5), (4, 3, 3, 3), x_grad=False, padding=1),
    _case("a-zero-gamma", (2, 3, 5, 5), (4, 3, 3, 3), zero_gamma=True, padding=1),
    _case("dilation-2", (2, 3, 7, 7), (4, 3, 3, 3), padding=2, dilation=2),
    # Frozen parameters, as tune's "head" freezes them: only gamma, or only W, learns.
    *(
        _case(
            f"only-{learns}-learns",
            (2, 3, 5, 5),
            (4, 3, 3, 3),
            x_grad=False,
            frozen=tuple(p for p in ("w", "b", "gamma", "beta") if p != learns),
            padding=1,
        )
        for learns in ("gamma", "w")
    ),
]
