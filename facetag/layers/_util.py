"""Small helpers the op families share (argument pairs, memory layout, channel views)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

IntPair = int | tuple[int, int]
Pair = tuple[int, int]


def pair(value: IntPair, op: str, name: str) -> Pair:
    """(a, b) from an int or a pair of ints; ValueError naming the op otherwise."""
    p = (value, value) if isinstance(value, int) else tuple(value)
    if len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p):
        raise ValueError(f"{op}: expected {name} to be an int or a pair of ints, got {value!r}")
    return (int(p[0]), int(p[1]))


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


def weight_and_bias(
    module: nn.Module, shape: tuple[int, ...], bias: bool, factory: dict[str, Any]
) -> None:
    """Give a conv or linear layer ``weight`` (shape) and ``bias`` (shape[0],) or None,
    initialised as torch initialises them (see ``init_like_torch``)."""
    weight = nn.Parameter(torch.empty(*shape, **factory))
    module.weight = weight
    b = nn.Parameter(torch.empty(shape[0], **factory)) if bias else None
    if b is None:
        module.register_parameter("bias", None)
    else:
        module.bias = b
    init_like_torch(weight, b)


@torch.no_grad()
def init_like_torch(weight: Tensor, bias: Tensor | None) -> None:
    """torch's default for Linear and Conv2d: kaiming_uniform(a=sqrt(5)) weight and bias
    ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = the weight's elements per output. The
    same seed then gives the same values as the torch.nn twin."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)
