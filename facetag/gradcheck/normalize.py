"""Gradient checks for L2 normalisation."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.normalize import l2_normalize


def _inputs(
    shape: tuple[int, ...],
    transpose: bool,
    row_scales: tuple[float, ...] | None,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor]:
    x = torch.randn(shape, generator=g, dtype=dtype)
    if row_scales is not None:
        # Rows of chosen size: some below eps (divided by eps), some above (by the norm).
        x = x / x.norm(dim=1, keepdim=True) * torch.tensor(row_scales, dtype=dtype)[:, None]
    if transpose:
        x = x.t()  # a non-contiguous view
    return (x.detach().requires_grad_(),)


def _case(
    name: str,
    shape: tuple[int, ...],
    dim: int = 1,
    eps: float = 1e-12,
    transpose: bool = False,
    row_scales: tuple[float, ...] | None = None,
) -> OpCase:
    return OpCase(
        "l2_normalize",
        name,
        ours=lambda x: l2_normalize(x, dim, eps),
        ref=lambda x: F.normalize(x, p=2.0, dim=dim, eps=eps),
        make_inputs=partial(_inputs, shape, transpose, row_scales),
    )


CASES: list[OpCase] = [
    _case("embeddings", (4, 8)),
    _case("batch1", (1, 16)),
    _case("single-feature", (3, 1)),
    _case("dim0", (5, 3), dim=0),
    _case("3d-last-dim", (2, 3, 5), dim=-1),
    _case("4d-channels", (2, 3, 2, 2), dim=1),
    _case("non-contiguous", (6, 5), transpose=True, dim=0),
    _case("rows-below-and-above-eps", (4, 6), eps=0.5, row_scales=(0.1, 0.3, 0.8, 2.0)),
]
