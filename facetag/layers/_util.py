"""Small helpers the op families share (argument pairs, memory layout, channel views)."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

IntPair = int | tuple[int, int]
Pair = tuple[int, int]


def pair(value: IntPair, op: str, name: str) -> Pair:
    """(a, b) from an int or a pair of ints; ValueError naming the op otherwise."""
    p = (value, value) if isinstance(value, int) else tuple(value)
    if len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p):
        raise ValueError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")
    return cast(Pair, p)


def is_channels_last(t: Tensor) -> bool:
    """True when t is laid out (N, H, W, C) in memory and not also plain contiguous."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def memory_format(t: Tensor) -> torch.memory_format:
    """The layout of t: channels_last or plain contiguous."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def channel_view(v: Tensor, ndim: int) -> Tensor:
    """(C,) -> (1, C, 1, ...) so that it broadcasts along dim 1 of an ndim tensor (a vector
    for a 1-D tensor stays as it is)."""
    return v.view((1, -1) + (1,) * (ndim - 2)) if ndim >= 2 else v
