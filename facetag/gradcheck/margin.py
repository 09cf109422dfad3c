"""Gradient checks for the ArcFace margin, the cosine matrix and the whole head.

The twin is ``arc_margin_reference``: the usual ArcFace code (Deng et al.; the popular
PyTorch port) written with built-in ops, differentiated by autograd. Inputs keep the target
cosines away from the branch points (cos(pi - m), and 0 for easy_margin) and from +-1.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.margin import arc_margin, cosine
from facetag.layers.normalize import l2_normalize


def arc_margin_reference(
    cos: Tensor,
    labels: Tensor | None,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
) -> Tensor:
    """ArcFace logits from cos (N, P) and labels (N,) with built-in ops: (N, P)."""
    if labels is None:
        return cos * scale
    sine = torch.sqrt((1.0 - torch.pow(cos, 2)).clamp(0, 1))
    phi = cos * math.cos(margin) - sine * math.sin(margin)
    if easy_margin:
        phi = torch.where(cos > 0, phi, cos)
    else:
        th = math.cos(math.pi - margin)
        mm = math.sin(math.pi - margin) * margin
        phi = torch.where(cos > th, phi, cos - mm)
    one_hot = torch.zeros_like(cos).scatter_(1, labels.view(-1, 1), 1.0)
    return (one_hot * phi + (1.0 - one_hot) * cos) * scale


def arc_head_reference(
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
) -> Tensor:
    """ArcMarginHead's forward with built-in ops: x (N, D), weight (P, D) -> (N, P)."""
    cos = F.linear(F.normalize(x), F.normalize(weight))
    return arc_margin_reference(cos, labels, scale, margin, easy_margin)


def arc_head(
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
) -> Tensor:
    """ArcMarginHead's forward as a function of its weight (ours)."""
    cos = cosine(l2_normalize(x, dim=1), l2_normalize(weight, dim=1))
    return arc_margin(cos, labels, scale, margin, easy_margin)


def _cos_inputs(
    target_cos: tuple[float, ...],
    P: int,
    with_labels: bool,
    transpose: bool,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, ...]:
    """cos (N, P) uniform in [-0.7, 0.85], the target column set to target_cos."""
    N = len(target_cos)
    labels = torch.arange(N) % P
    cos = (
        torch.rand(P, N, generator=g, dtype=dtype).t()
        if transpose
        else (torch.rand(N, P, generator=g, dtype=dtype))
    )
    cos = cos * 1.55 - 0.7  # non-contiguous (N, P) when transposed
    cos[torch.arange(N), labels] = torch.tensor(target_cos, dtype=dtype)
    cos = cos.detach().requires_grad_()
    return (cos, labels) if with_labels else (cos,)


def _margin_case(
    name: str,
    target_cos: tuple[float, ...],
    P: int = 5,
    with_labels: bool = True,
    transpose: bool = False,
    **kw: Any,
) -> OpCase:
    def ours(cos: Tensor, labels: Tensor | None = None) -> Tensor:
        return arc_margin(cos, labels, **kw)

    def ref(cos: Tensor, labels: Tensor | None = None) -> Tensor:
        return arc_margin_reference(cos, labels, **kw)

    return OpCase(
        "arc_margin",
        name,
        ours=ours,
        ref=ref,
        make_inputs=partial(_cos_inputs, target_cos, P, with_labels, transpose),
    )


def _head_inputs(
    N: int, D: int, P: int, with_labels: bool, dtype: torch.dtype, g: torch.Generator
) -> tuple[Tensor, ...]:
    x = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(P, D, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randperm(P, generator=g)[:N] % P
    return (x, weight, labels) if with_labels else (x, weight)


def _head_case(
    name: str, N: int = 4, D: int = 8, P: int = 5, with_labels: bool = True, **kw: Any
) -> OpCase:
    def ours(x: Tensor, weight: Tensor, labels: Tensor | None = None) -> Tensor:
        return arc_head(x, weight, labels, **kw)

    def ref(x: Tensor, weight: Tensor, labels: Tensor | None = None) -> Tensor:
        return arc_head_reference(x, weight, labels, **kw)

    return OpCase(
        "arc_margin_head",
        name,
        ours=ours,
        ref=ref,
        make_inputs=partial(_head_inputs, N, D, P, with_labels),
    )


def _cosine_inputs(dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = F.normalize(torch.randn(4, 6, generator=g, dtype=dtype))
    w = F.normalize(torch.randn(5, 6, generator=g, dtype=dtype)).t().contiguous().t()
    return x.requires_grad_(), w.requires_grad_()


CASES: list[OpCase] = [
    # m = 0.5: the fallback branch starts at cos(pi - 0.5) = -0.878.
    _margin_case("default", (0.3, 0.85, -0.5, 0.6, -0.1)),
    _margin_case("fallback-branch", (-0.95, 0.4, -0.92, -0.8), scale=30.0, margin=0.5),
    _margin_case("easy-margin", (-0.4, 0.5, -0.9, 0.2), easy_margin=True),
    _margin_case("m0.2-s8-batch1", (0.7,), P=3, scale=8.0, margin=0.2),
    _margin_case("m0-is-scaled-cos", (0.3, -0.6, 0.9), margin=0.0),
    _margin_case("non-contiguous", (0.2, -0.95, 0.75, 0.5), P=6, transpose=True),
    _margin_case("no-labels", (0.3, 0.5, -0.2), with_labels=False),
    OpCase(
        "cosine", "unit-rows", ours=cosine, ref=lambda x, w: x @ w.t(), make_inputs=_cosine_inputs
    ),
    _head_case("default"),
    _head_case("easy-margin-s16", easy_margin=True, scale=16.0),
    _head_case("batch1", N=1, D=5, P=3),
    _head_case("no-labels", with_labels=False),
]
