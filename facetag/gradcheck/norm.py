"""Gradient checks for batch norm (facetag.layers.norm): training and eval mode.

Batch norm is smooth, so random inputs do; they are given a mean and scale away from
0 and 1 so that the centring and scaling terms of the backward are exercised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from facetag.gradcheck.core import OpCase
from facetag.layers.norm import batch_norm

EPS = 1e-5


def _x(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, layout: str) -> Tensor:
    x = torch.randn(shape, dtype=dtype, generator=g) * 1.5 + 0.7
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # same shape, last two dims' strides swapped
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.requires_grad_()


def _inputs(
    shape: tuple[int, ...],
    affine: str = "weight+bias",
    layout: str = "contiguous",
    running: bool = False,
) -> Callable[[torch.dtype, torch.Generator], tuple[Tensor, ...]]:
    """x, then weight and bias as ``affine`` says, then running mean and var if ``running``."""

    def make(dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor, ...]:
        C = shape[1]
        out = [_x(shape, dtype, g, layout)]
        if affine != "none":
            out.append((torch.rand(C, dtype=dtype, generator=g) + 0.5).requires_grad_())
        if affine == "weight+bias":
            out.append(torch.randn(C, dtype=dtype, generator=g).requires_grad_())
        if running:
            out.append(torch.randn(C, dtype=dtype, generator=g))  # running_mean
            out.append(torch.rand(C, dtype=dtype, generator=g) + 0.5)  # running_var
        return tuple(out)

    return make


def _train(ours: bool, affine: str) -> Callable[..., Tensor]:
    """Training-mode batch norm with fresh running statistics (updated, not read)."""
    bn = batch_norm if ours else F.batch_norm

    def run(x: Tensor, *params: Tensor) -> Tensor:
        C = x.shape[1]
        w = params[0] if affine != "none" else None
        b = params[1] if affine == "weight+bias" else None
        rm = torch.zeros(C, dtype=x.dtype)
        rv = torch.ones(C, dtype=x.dtype)
        return bn(x, rm, rv, w, b, True, 0.1, EPS)

    return run


def _eval(ours: bool, affine: str) -> Callable[..., Tensor]:
    bn = batch_norm if ours else F.batch_norm

    def run(x: Tensor, *params: Tensor) -> Tensor:
        *wb, rm, rv = params
        w = wb[0] if affine != "none" else None
        b = wb[1] if affine == "weight+bias" else None
        return bn(x, rm, rv, w, b, False, 0.1, EPS)

    return run


TRAIN = [
    ((2, 3, 5, 4), "weight+bias", "contiguous"),
    ((1, 2, 3, 3), "weight+bias", "contiguous"),  # batch 1: 9 values per channel
    ((2, 3, 5, 4), "weight+bias", "channels_last"),
    ((2, 3, 5, 4), "weight+bias", "transposed"),
    ((2, 3, 5, 4), "none", "contiguous"),
    ((2, 3, 5, 4), "weight", "contiguous"),
    ((5, 4), "weight+bias", "contiguous"),  # BatchNorm1d (N, D)
    ((3, 4, 5), "weight+bias", "contiguous"),  # BatchNorm1d (N, D, L)
    ((2, 1, 3, 3), "weight+bias", "contiguous"),  # one channel
]
EVAL = [
    ((2, 3, 5, 4), "weight+bias", "contiguous"),
    ((1, 3, 2, 3), "weight+bias", "channels_last"),
    ((2, 3, 5, 4), "none", "contiguous"),
    ((5, 4), "weight+bias", "contiguous"),
    ((1, 4, 3), "weight", "contiguous"),
]

CASES: list[OpCase] = [
    OpCase(
        "batch_norm",
        f"train,{'x'.join(map(str, shape))},{affine},{layout}",
        _train(True, affine),
        _train(False, affine),
        _inputs(shape, affine, layout),
    )
    for shape, affine, layout in TRAIN
] + [
    OpCase(
        "batch_norm",
        f"eval,{'x'.join(map(str, shape))},{affine},{layout}",
        _eval(True, affine),
        _eval(False, affine),
        _inputs(shape, affine, layout, running=True),
    )
    for shape, affine, layout in EVAL
]
