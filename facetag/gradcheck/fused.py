"""Gradient checks for the fused batch norm + activation (facetag.layers.fused).

The activation has a kink at y = 0, where finite differences are meaningless and where a
different rounding in the twin can flip a sign, so the inputs are built to keep every
pre-activation y away from 0 (``bn_act_inputs``); tests/layers/test_fused.py reuses them
at sizes that take the compiled path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor
from torch.nn import functional as F

from facetag.gradcheck.core import OpCase
from facetag.layers.fused import Activation, batch_norm_act

EPS = 1e-5


def bn_act_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    g: torch.Generator,
    *,
    affine: str = "weight+bias",
    prelu_parameters: int = 0,
    training: bool = True,
    layout: str = "contiguous",
) -> tuple[Tensor, ...]:
    """x, then weight and bias (as ``affine`` says), the PReLU slopes (if
    prelu_parameters > 0) and, in eval mode, running_mean and running_var.

    Every channel of x is off[c] + scale[c] * (a shuffled even grid on [-1, 1], symmetric
    about 0), and the bias puts the zero of y = weight * x_hat + bias half a step between two
    grid points, so |y| >= |weight| * scale * invstd * step / 2. Training without a bias
    has the zero at the grid's centre, so the count per channel must then be even; eval
    without a bias moves the running mean instead.
    """
    C = shape[1]
    n = 1
    for s in shape:
        n *= s
    n //= C
    f64 = torch.float64
    step = 2 / max(n, 2)  # the grid spans [-1, 1], whatever n
    grid = (torch.arange(n, dtype=f64) - (n - 1) / 2) * step  # (n,) symmetric: mean 0
    if training and affine != "weight+bias" and n % 2:
        raise ValueError(f"bn_act_inputs: expected an even count per channel, got {n}")
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(C)])  # (C, n)
    off = torch.rand(C, generator=g, dtype=f64) * 2 - 1  # (C,)
    scale = torch.rand(C, generator=g, dtype=f64) * 1.5 + 0.5  # (C,)
    values = off[:, None] + scale[:, None] * grid[perms]  # (C, n)
    x = values.reshape(C, shape[0], -1).transpose(0, 1).contiguous().view(shape)  # (N, C, *)
    weight = torch.rand(C, generator=g, dtype=f64) + 0.5
    weight[0] = -weight[0]  # a negative scale flips which side is positive
    # The zero of y sits half a step after grid point k[c].
    k = torch.randint(0, max(n - 1, 1), (C,), generator=g).to(f64)
    z = (k + 0.5 - (n - 1) / 2) * step
    if training:
        invstd = 1 / torch.sqrt(scale**2 * (grid**2).mean() + EPS)  # x - mean = scale * grid
        bias = -weight * scale * invstd * z
        running: list[Tensor] = []
    else:
        # y = weight * (x - running_mean) * invstd + bias: without a bias the running mean
        # itself is put half a step between two grid points.
        running_mean = torch.randn(C, generator=g, dtype=f64)
        if affine != "weight+bias":
            running_mean = off + scale * z
        running_var = torch.rand(C, generator=g, dtype=f64) + 0.5
        invstd = 1 / torch.sqrt(running_var + EPS)
        bias = -weight * invstd * (off + scale * z - running_mean)
        running = [running_mean.to(dtype), running_var.to(dtype)]
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # same shape, last two dims' strides swapped
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = [x.requires_grad_()]
    if affine != "none":
        out.append(weight.to(dtype).requires_grad_())
    if affine == "weight+bias":
        out.append(bias.to(dtype).requires_grad_())
    if prelu_parameters:
        slopes = torch.linspace(-0.2, 0.4, prelu_parameters, dtype=f64) + 0.03
        out.append(slopes.to(dtype).requires_grad_())
    return (*out, *running)


def bn_act(
    ours: bool,
    activation: str,
    affine: str = "weight+bias",
    training: bool = True,
    negative_slope: float = 0.01,
) -> Callable[..., Tensor]:
    """The op (ours) or its torch twin, taking the tensors of ``bn_act_inputs``."""

    def run(x: Tensor, *params: Tensor) -> Tensor:
        params_list = list(params)
        w = params_list.pop(0) if affine != "none" else None
        b = params_list.pop(0) if affine == "weight+bias" else None
        a = params_list.pop(0) if activation == "prelu" else None
        if training:
            C = x.shape[1]
            rm, rv = torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype)
        else:
            rm, rv = params_list
        if ours:
            return batch_norm_act(
                x,
                rm,
                rv,
                w,
                b,
                training,
                0.1,
                EPS,
                cast(Activation, activation),
                negative_slope,
                a,
            )
        y = F.batch_norm(x, rm, rv, w, b, training, 0.1, EPS)
        if activation == "relu":
            return F.relu(y)
        if activation == "leaky_relu":
            return F.leaky_relu(y, negative_slope)
        assert a is not None
        return F.prelu(y, a)

    return run


def _case(
    shape: tuple[int, ...],
    activation: str,
    *,
    affine: str = "weight+bias",
    P: int = 0,
    training: bool = True,
    layout: str = "contiguous",
    negative_slope: float = 0.01,
) -> OpCase:
    def make(dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor, ...]:
        return bn_act_inputs(
            shape, dtype, g, affine=affine, prelu_parameters=P, training=training, layout=layout
        )

    name = ",".join(
        [
            "train" if training else "eval",
            "x".join(map(str, shape)),
            activation + (f"(P={P})" if P else ""),
            *([f"slope={negative_slope}"] if activation == "leaky_relu" else []),
            affine,
            layout,
        ]
    )
    return OpCase(
        "batch_norm_act",
        name,
        bn_act(True, activation, affine, training, negative_slope),
        bn_act(False, activation, affine, training, negative_slope),
        make,
    )


CASES: list[OpCase] = [
    _case((2, 3, 5, 4), "prelu", P=3),
    _case((2, 3, 5, 4), "prelu", P=1),
    _case((2, 3, 5, 4), "relu"),
    _case((2, 3, 5, 4), "leaky_relu", negative_slope=0.2),
    _case((2, 3, 5, 4), "leaky_relu", negative_slope=-0.1),
    _case((1, 2, 3, 3), "prelu", P=2),  # batch 1, 9 values per channel
    _case((2, 3, 5, 4), "prelu", P=3, layout="channels_last"),
    _case((2, 3, 5, 4), "relu", layout="transposed"),
    _case((2, 3, 5, 4), "prelu", P=3, affine="none"),
    _case((2, 3, 5, 4), "relu", affine="weight"),
    _case((2, 3, 5, 4), "prelu", P=3, training=False),
    _case((1, 3, 2, 3), "relu", training=False, layout="channels_last"),
    _case((2, 3, 5, 4), "leaky_relu", affine="none", training=False, negative_slope=0.2),
]
