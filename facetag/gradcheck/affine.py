"""Gradient checks for the per-channel affine (scale and shift)."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.affine import channel_affine


def _inputs(
    shape: tuple[int, int, int, int],
    layout: str,
    x_grad: bool,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, ...]:
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, W-major
    gamma = torch.randn(C, generator=g, dtype=dtype, requires_grad=True)
    beta = torch.randn(C, generator=g, dtype=dtype, requires_grad=True)
    return x.detach().requires_grad_(x_grad), gamma, beta


def _reference(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return x * gamma[None, :, None, None] + beta[None, :, None, None]


def _case(
    name: str,
    shape: tuple[int, int, int, int],
    layout: str = "contiguous",
    x_grad: bool = True,
) -> OpCase:
    return OpCase(
        "channel_affine",
        name,
        ours=channel_affine,
        ref=_reference,
        make_inputs=partial(_inputs, shape, layout, x_grad),
    )


CASES: list[OpCase] = [
    _case("1x1", (1, 1, 1, 1)),
    _case("odd", (2, 3, 5, 4)),
    _case("eight-channels", (3, 8, 5, 5)),
    _case("channels-last", (2, 3, 4, 5), "channels_last"),
    _case("non-contiguous", (2, 3, 4, 5), "strided"),
    _case("x-needs-no-grad", (2, 3, 4, 4), x_grad=False),
]
