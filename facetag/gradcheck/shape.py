"""Gradient checks for flatten."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.shape import flatten


def _inputs(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, g: torch.Generator
) -> tuple[Tensor]:
    x = torch.randn(shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(1, 2)  # a non-contiguous view: flatten must copy
    return (x.detach().requires_grad_(),)


def _case(
    name: str,
    shape: tuple[int, ...],
    start_dim: int = 1,
    end_dim: int = -1,
    layout: str = "contiguous",
) -> OpCase:
    return OpCase(
        "flatten",
        name,
        ours=lambda x: flatten(x, start_dim, end_dim),
        ref=lambda x: torch.flatten(x, start_dim, end_dim),
        make_inputs=partial(_inputs, shape, layout),
    )


CASES: list[OpCase] = [
    _case("default", (2, 3, 4, 5)),
    _case("batch1", (1, 1, 1, 1)),
    _case("all-dims", (2, 3, 4, 5), 0, -1),
    _case("middle-dims", (2, 3, 4, 5), 1, 2),
    _case("one-dim-is-noop", (2, 3, 4), 1, 1),
    _case("negative-dims", (2, 3, 4, 5), -3, -2),
    _case("channels-last", (2, 3, 4, 5), layout="channels_last"),
    _case("non-contiguous", (2, 3, 4, 5), layout="transposed"),
]
