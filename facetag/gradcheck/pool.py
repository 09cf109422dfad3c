"""Gradient checks for max, average and global average pooling."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.pool import avg_pool2d, global_avg_pool2d, max_pool2d

Maker = Callable[[torch.dtype, torch.Generator], tuple[Tensor, ...]]


def _layout(x: Tensor, layout: str) -> Tensor:
    """x as a leaf in the given layout: "contiguous", "channels_last" or "strided"."""
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x
        x = wide[..., ::2]  # the same values, every other column of a wider tensor
    return x.detach().requires_grad_()


def distinct_values(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> Tensor:
    """A shuffled ramp in [-2, 2): no ties, neighbours 4/numel apart (>> the FD step)."""
    n = torch.Size(shape).numel()
    return ((torch.randperm(n, generator=g).to(dtype) - n / 2) * (4 / n)).view(shape)


def _pool_inputs(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, g: torch.Generator
) -> tuple[Tensor]:
    return (_layout(distinct_values(shape, dtype, g), layout),)


def _randn_inputs(
    shape: tuple[int, ...], layout: str, dtype: torch.dtype, g: torch.Generator
) -> tuple[Tensor]:
    return (_layout(torch.randn(shape, generator=g, dtype=dtype), layout),)


def _max_case(name: str, shape: tuple[int, ...], layout: str = "contiguous", **kw: Any) -> OpCase:
    return OpCase(
        "max_pool2d",
        name,
        ours=lambda x: cast(Tensor, max_pool2d(x, **kw)),
        ref=lambda x: F.max_pool2d(x, **kw),
        make_inputs=partial(_pool_inputs, shape, layout),
    )


def _avg_case(name: str, shape: tuple[int, ...], layout: str = "contiguous", **kw: Any) -> OpCase:
    return OpCase(
        "avg_pool2d",
        name,
        ours=lambda x: avg_pool2d(x, **kw),
        ref=lambda x: F.avg_pool2d(x, **kw),
        make_inputs=partial(_randn_inputs, shape, layout),
    )


def _global_case(name: str, shape: tuple[int, ...], layout: str = "contiguous") -> OpCase:
    return OpCase(
        "global_avg_pool2d",
        name,
        ours=global_avg_pool2d,
        ref=lambda x: F.adaptive_avg_pool2d(x, 1).flatten(1),
        make_inputs=partial(_randn_inputs, shape, layout),
    )


CASES: list[OpCase] = [
    _max_case("k2", (2, 3, 6, 6), kernel_size=2),
    _max_case("k2-batch1-odd", (1, 2, 7, 5), kernel_size=2),
    _max_case("k3-s2-p1", (2, 2, 7, 6), kernel_size=3, stride=2, padding=1),
    _max_case("k3-s1-overlap", (2, 2, 5, 5), kernel_size=3, stride=1),
    _max_case("k2-s1-d2", (1, 2, 7, 7), kernel_size=2, stride=1, dilation=2),
    _max_case(
        "k3-s2-d2-p1-ceil",
        (1, 2, 8, 7),
        kernel_size=3,
        stride=2,
        padding=1,
        dilation=2,
        ceil_mode=True,
    ),
    _max_case("k2-p1-ceil-drops-last", (2, 2, 5, 5), kernel_size=2, padding=1, ceil_mode=True),
    _max_case("k3-s2-ceil", (2, 2, 6, 7), kernel_size=3, stride=2, ceil_mode=True),
    _max_case("kernel-is-input", (2, 3, 4, 4), kernel_size=4),
    _max_case(
        "rect-k2x3-s1x2-p1x0", (1, 2, 6, 7), kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)
    ),
    _max_case("k2-non-contiguous", (2, 3, 6, 6), "strided", kernel_size=2),
    _max_case("k2-channels-last", (2, 3, 6, 6), "channels_last", kernel_size=2),
    _max_case("k3-s1-channels-last", (2, 3, 5, 5), "channels_last", kernel_size=3, stride=1),
    _avg_case("k2", (2, 3, 6, 6), kernel_size=2),
    _avg_case("k3-s2-batch1-odd", (1, 2, 7, 5), kernel_size=3, stride=2),
    _avg_case("k3-s2-p1", (2, 2, 7, 6), kernel_size=3, stride=2, padding=1),
    _avg_case(
        "k3-s2-p1-exclude-pad",
        (2, 2, 7, 6),
        kernel_size=3,
        stride=2,
        padding=1,
        count_include_pad=False,
    ),
    _avg_case("k3-s2-p1-ceil", (2, 2, 6, 6), kernel_size=3, stride=2, padding=1, ceil_mode=True),
    _avg_case(
        "k3-s2-p1-ceil-exclude-pad",
        (2, 2, 6, 6),
        kernel_size=3,
        stride=2,
        padding=1,
        ceil_mode=True,
        count_include_pad=False,
    ),
    _avg_case("k2-p1-ceil-drops-last", (2, 2, 5, 5), kernel_size=2, padding=1, ceil_mode=True),
    _avg_case(
        "k3-s2-ceil-exclude-pad",
        (2, 2, 6, 7),
        kernel_size=3,
        stride=2,
        ceil_mode=True,
        count_include_pad=False,
    ),
    _avg_case(
        "k3-s1-overlap-divisor5",
        (2, 2, 5, 5),
        kernel_size=3,
        stride=1,
        padding=1,
        divisor_override=5,
    ),
    _avg_case("kernel-is-input", (2, 3, 4, 4), kernel_size=4),
    _avg_case(
        "rect-k2x3-s1x2-p1x0", (1, 2, 6, 7), kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)
    ),
    _avg_case("k2-non-contiguous", (2, 3, 6, 6), "strided", kernel_size=2),
    _avg_case(
        "k3-s2-p1-channels-last", (2, 3, 6, 6), "channels_last", kernel_size=3, stride=2, padding=1
    ),
    _global_case("1x1", (1, 1, 1, 1)),
    _global_case("odd", (2, 3, 5, 4)),
    _global_case("non-contiguous", (2, 3, 4, 4), "strided"),
    _global_case("channels-last", (2, 3, 4, 4), "channels_last"),
]
