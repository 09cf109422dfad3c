"""Gradient checks for linear: 2-D, 3-D and 1-D x, batch 1, no bias, a strided x, and an x
that needs no gradient (the weight and bias grads alone)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.linear import linear


def _linear_inputs(
    x_shape: tuple[int, ...],
    P: int,
    bias: bool,
    strided: bool,
    x_grad: bool,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, ...]:
    D = x_shape[-1]
    if strided:
        # x as the transpose of a contiguous (D, M) tensor: column-major, not a plain view
        x = torch.randn(D, *x_shape[:-1], generator=g, dtype=dtype).movedim(0, -1)
    else:
        x = torch.randn(x_shape, generator=g, dtype=dtype)
    w = torch.randn(P, D, generator=g, dtype=dtype, requires_grad=True)
    out: tuple[Tensor, ...] = (x.requires_grad_(x_grad), w)
    if bias:
        out += (torch.randn(P, generator=g, dtype=dtype, requires_grad=True),)
    return out


def _linear_case(
    name: str,
    x_shape: tuple[int, ...],
    P: int,
    bias: bool = True,
    strided: bool = False,
    x_grad: bool = True,
    big: tuple[tuple[int, ...], int] | None = None,
) -> OpCase:
    """A linear case; `big` gives a larger (x_shape, P) for the float32 torch comparison."""
    small = partial(_linear_inputs, x_shape, P, bias, strided, x_grad)
    return OpCase(
        "linear",
        name,
        ours=linear,
        ref=F.linear,
        make_inputs=partial(_linear_inputs, *big, bias, strided, x_grad) if big else small,
        make_gradcheck_inputs=small if big else None,
    )


CASES: list[OpCase] = [
    _linear_case("2d", (4, 5), 3, big=((64, 256), 128)),
    _linear_case("batch1", (1, 5), 3),
    _linear_case("3d", (2, 3, 4), 3, big=((8, 16, 64), 32)),
    _linear_case("1d", (5,), 3),
    _linear_case("no-bias", (4, 5), 3, bias=False),
    _linear_case("strided-input", (4, 5), 3, strided=True),
    _linear_case("x-needs-no-grad", (4, 5), 3, x_grad=False),
]
