"""Gradient checks for the residual additions: add and dlib's zero-padded add_prev."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.residual import add, zero_pad_add

Shape4 = tuple[int, int, int, int]


def _leaf(x: Tensor, layout: str, grad: bool) -> Tensor:
    """x as a leaf in the given layout: "contiguous", "channels_last" or "strided"."""
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, W-major
    return x.detach().requires_grad_(grad)


def _inputs(
    x_shape: Shape4,
    skip_shape: Shape4,
    layouts: tuple[str, str],
    grads: tuple[bool, bool],
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, Tensor]:
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    skip = torch.randn(skip_shape, generator=g, dtype=dtype)
    return _leaf(x, layouts[0], grads[0]), _leaf(skip, layouts[1], grads[1])


def _padded_sum(x: Tensor, skip: Tensor) -> Tensor:
    """The torch reference: F.pad each input at the end of (C, H, W), then add."""
    C, H, W = (max(a, b) for a, b in zip(x.shape[1:], skip.shape[1:], strict=True))

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, W - t.shape[3], 0, H - t.shape[2], 0, C - t.shape[1]))

    return pad(x) + pad(skip)


def _add_case(
    name: str,
    shape: Shape4,
    layouts: tuple[str, str] = ("contiguous", "contiguous"),
    grads: tuple[bool, bool] = (True, True),
) -> OpCase:
    return OpCase(
        "add",
        name,
        ours=add,
        ref=torch.add,
        make_inputs=partial(_inputs, shape, shape, layouts, grads),
    )


def _pad_case(
    name: str,
    x_shape: Shape4,
    skip_shape: Shape4,
    layouts: tuple[str, str] = ("contiguous", "contiguous"),
    grads: tuple[bool, bool] = (True, True),
) -> OpCase:
    return OpCase(
        "zero_pad_add",
        name,
        ours=zero_pad_add,
        ref=_padded_sum,
        make_inputs=partial(_inputs, x_shape, skip_shape, layouts, grads),
    )


CASES: list[OpCase] = [
    _add_case("1x1", (1, 1, 1, 1)),
    _add_case("odd", (2, 3, 5, 4)),
    _add_case("channels-last", (2, 3, 4, 5), ("channels_last", "channels_last")),
    _add_case("mixed-layouts", (2, 3, 4, 5), ("channels_last", "strided")),
    _add_case("skip-needs-no-grad", (2, 3, 4, 4), grads=(True, False)),
    _pad_case("same-shape", (2, 3, 4, 4), (2, 3, 4, 4)),
    # A down block at 35 or 17 px: the 2x2 average-pooled skip has half the channels.
    _pad_case("skip-fewer-channels", (2, 4, 3, 3), (2, 2, 3, 3)),
    # The 8 px down block: conv 3x3, pooled skip 4x4 with half the channels.
    _pad_case("skip-larger-fewer-channels", (2, 4, 3, 3), (2, 2, 4, 4)),
    # The 4 px down block: conv 1x1, pooled skip 2x2.
    _pad_case("skip-larger-batch1", (1, 4, 1, 1), (1, 2, 2, 2)),
    _pad_case("each-larger-somewhere", (2, 2, 3, 2), (2, 3, 2, 4)),
    _pad_case("x-larger", (2, 3, 4, 5), (2, 1, 2, 3)),
    _pad_case("channels-last-x", (2, 4, 3, 3), (2, 2, 4, 4), ("channels_last", "contiguous")),
    _pad_case("channels-last-both", (2, 4, 3, 3), (2, 2, 3, 3), ("channels_last", "channels_last")),
    _pad_case("non-contiguous-skip", (2, 4, 3, 3), (2, 2, 4, 4), ("contiguous", "strided")),
    _pad_case("skip-needs-no-grad", (2, 4, 3, 3), (2, 2, 4, 4), grads=(True, False)),
    _pad_case("x-needs-no-grad", (2, 4, 3, 3), (2, 2, 4, 4), grads=(False, True)),
]
