"""Gradient checks for ReLU, LeakyReLU and PReLU (facetag.layers.activation).

Inputs are a shuffled grid kept at least 0.25 * scale away from the kink at 0, where
finite differences are meaningless; the exact convention at 0 is pinned by
tests/layers/test_activation.py instead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from facetag.gradcheck.core import OpCase
from facetag.layers.activation import leaky_relu, prelu, relu


def away_from_zero(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    g: torch.Generator,
    scale: float = 0.1,
    layout: str = "contiguous",
) -> Tensor:
    """A leaf of the given shape holding a shuffled grid (k + 0.25) * scale, never 0.

    layout "channels_last" or "transposed" (last two dims swapped) gives a
    non-contiguous tensor of the same shape.
    """
    n = 1
    for s in shape:
        n *= s
    grid = (torch.arange(n, dtype=dtype) - (n - 1) / 2 + 0.25) * scale
    x = grid[torch.randperm(n, generator=g)].reshape(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.reshape(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    elif layout != "contiguous":
        raise ValueError(
            f"away_from_zero: expected layout in ('contiguous', 'channels_last', "
            f"'transposed'), got {layout!r}"
        )
    return x.detach().requires_grad_()


def _x_only(shape: tuple[int, ...], layout: str = "contiguous") -> Callable[..., tuple[Tensor]]:
    def make(dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor]:
        return (away_from_zero(shape, dtype, g, layout=layout),)

    return make


def _x_and_slopes(
    shape: tuple[int, ...], num_parameters: int, layout: str = "contiguous"
) -> Callable[..., tuple[Tensor, Tensor]]:
    def make(dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = away_from_zero(shape, dtype, g, layout=layout)
        # Slopes in [-0.3, 0.5]: negative and > 0 ones, none exactly 0 or 1.
        slopes = torch.linspace(-0.3, 0.5, num_parameters, dtype=dtype) + 0.05
        return x, slopes.requires_grad_()

    return make


def _inplace(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fn(x.clone(), ..., inplace=True): in place on a copy, since x is a leaf."""

    def run(x: Tensor) -> Tensor:
        return fn(x.clone(), inplace=True)

    return run


SHAPES = [(1, 1, 1, 1), (2, 3, 5, 4), (3, 7)]

CASES: list[OpCase] = []
for shape in SHAPES:
    tag = "x".join(map(str, shape))
    CASES += [
        OpCase("relu", tag, relu, F.relu, _x_only(shape)),
        OpCase(
            "leaky_relu",
            f"{tag},slope=0.2",
            partial(leaky_relu, negative_slope=0.2),
            partial(F.leaky_relu, negative_slope=0.2),
            _x_only(shape),
        ),
        OpCase("prelu", f"{tag},P=1", prelu, F.prelu, _x_and_slopes(shape, 1)),
        OpCase("prelu", f"{tag},P=C", prelu, F.prelu, _x_and_slopes(shape, shape[1])),
    ]
CASES += [
    OpCase("relu", "2x3x5x4,transposed", relu, F.relu, _x_only((2, 3, 5, 4), "transposed")),
    OpCase("relu", "2x3x5x4,inplace", _inplace(relu), F.relu, _x_only((2, 3, 5, 4))),
    OpCase(
        "leaky_relu",
        "2x3x5x4,slope=-0.1",
        partial(leaky_relu, negative_slope=-0.1),
        partial(F.leaky_relu, negative_slope=-0.1),
        _x_only((2, 3, 5, 4)),
    ),
    OpCase(
        "leaky_relu",
        "2x3x5x4,slope=0.2,inplace",
        _inplace(partial(leaky_relu, negative_slope=0.2)),
        partial(F.leaky_relu, negative_slope=0.2),
        _x_only((2, 3, 5, 4)),
    ),
    OpCase(
        "leaky_relu",
        "2x3x5x4,channels_last",
        leaky_relu,
        F.leaky_relu,
        _x_only((2, 3, 5, 4), "channels_last"),
    ),
    OpCase("prelu", "7,P=1", prelu, F.prelu, _x_and_slopes((7,), 1)),
    OpCase("prelu", "2x3x2x2x3,P=C", prelu, F.prelu, _x_and_slopes((2, 3, 2, 2, 3), 3)),
    OpCase(
        "prelu",
        "2x3x5x4,P=C,transposed",
        prelu,
        F.prelu,
        _x_and_slopes((2, 3, 5, 4), 3, "transposed"),
    ),
    OpCase(
        "prelu",
        "2x3x5x4,P=C,channels_last",
        prelu,
        F.prelu,
        _x_and_slopes((2, 3, 5, 4), 3, "channels_last"),
    ),
]
