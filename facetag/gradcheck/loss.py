"""Gradient checks for cross-entropy, binary cross-entropy with logits and smooth L1.

Every combination of the options each loss supports gets a case; the float64 inputs keep
smooth L1's differences away from its kinks (|d| == beta, d == 0).
"""

from __future__ import annotations

import itertools
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.loss import binary_cross_entropy_with_logits, cross_entropy, smooth_l1_loss

REDUCTIONS = ("mean", "sum", "none")


def _ce_inputs(
    N: int,
    P: int,
    weighted: bool,
    ignore_index: int | None,
    transpose: bool,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, ...]:
    if transpose:
        logits = torch.randn(P, N, generator=g, dtype=dtype).t() * 2  # non-contiguous (N, P)
    else:
        logits = torch.randn(N, P, generator=g, dtype=dtype) * 2
    target = torch.arange(N) % P  # every class appears
    if ignore_index is not None and N > 1:
        target[::3] = ignore_index  # some samples ignored
    weight = torch.rand(P, generator=g, dtype=dtype) + 0.5
    inputs = (logits.detach().requires_grad_(), target)
    return (*inputs, weight) if weighted else inputs


def _ce_case(
    reduction: str,
    weighted: bool,
    smoothing: float,
    ignore_index: int | None,
    N: int = 5,
    P: int = 4,
    transpose: bool = False,
    name: str = "",
) -> OpCase:
    index = -100 if ignore_index is None else ignore_index
    name = name or "-".join(
        [reduction]
        + (["weighted"] if weighted else [])
        + ([f"smooth{smoothing}"] if smoothing else [])
        + ([f"ignore{ignore_index}"] if ignore_index is not None else [])
    )

    def ours(z: Tensor, t: Tensor, w: Tensor | None = None) -> Tensor:
        return cross_entropy(z, t, w, index, reduction, smoothing)

    def ref(z: Tensor, t: Tensor, w: Tensor | None = None) -> Tensor:
        return F.cross_entropy(
            z, t, w, ignore_index=index, reduction=reduction, label_smoothing=smoothing
        )

    return OpCase(
        "cross_entropy",
        name,
        ours=ours,
        ref=ref,
        make_inputs=partial(_ce_inputs, N, P, weighted, ignore_index, transpose),
    )


def _bce_inputs(
    shape: tuple[int, int],
    weighted: bool,
    pos_weighted: bool,
    target_grad: bool,
    logit_scale: float,
    transpose: bool,
    dtype: torch.dtype,
    g: torch.Generator,
) -> tuple[Tensor, ...]:
    N, P = shape
    logits = torch.randn(N, P, generator=g, dtype=dtype) * logit_scale
    target = torch.rand(N, P, generator=g, dtype=dtype)
    if transpose:
        logits, target = logits.t().contiguous().t(), target.t().contiguous().t()
    inputs: tuple[Tensor, ...] = (
        logits.detach().requires_grad_(),
        target.detach().requires_grad_(target_grad),
    )
    if weighted:
        inputs += (torch.rand(P, generator=g, dtype=dtype) + 0.5,)  # per class, broadcast
    if pos_weighted:
        inputs += (torch.rand(P, generator=g, dtype=dtype) * 3 + 0.1,)
    return inputs


def _bce_case(
    reduction: str,
    weighted: bool,
    pos_weighted: bool,
    target_grad: bool,
    shape: tuple[int, int] = (3, 4),
    logit_scale: float = 2.0,
    transpose: bool = False,
    name: str = "",
) -> OpCase:
    name = name or "-".join(
        [reduction]
        + (["weighted"] if weighted else [])
        + (["pos-weighted"] if pos_weighted else [])
        + (["target-grad"] if target_grad else [])
    )

    def split(extra: tuple[Tensor, ...]) -> tuple[Tensor | None, Tensor | None]:
        weight = extra[0] if weighted else None
        pos_weight = extra[-1] if pos_weighted else None
        return weight, pos_weight

    def ours(x: Tensor, t: Tensor, *extra: Tensor) -> Tensor:
        weight, pos_weight = split(extra)
        return binary_cross_entropy_with_logits(x, t, weight, pos_weight, reduction)

    def ref(x: Tensor, t: Tensor, *extra: Tensor) -> Tensor:
        weight, pos_weight = split(extra)
        return F.binary_cross_entropy_with_logits(
            x, t, weight, reduction=reduction, pos_weight=pos_weight
        )

    return OpCase(
        "binary_cross_entropy_with_logits",
        name,
        ours=ours,
        ref=ref,
        make_inputs=partial(
            _bce_inputs, shape, weighted, pos_weighted, target_grad, logit_scale, transpose
        ),
    )


def _smooth_l1_inputs(
    shape: tuple[int, ...], beta: float, dtype: torch.dtype, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    target = torch.randn(shape, generator=g, dtype=dtype)
    # |x - t| in [0.2, 0.8]*beta (quadratic zone) or [1.2, 2.5]*beta (linear zone), at least
    # 0.2 from the kinks at |d| == beta and at d == 0 (scaled by 1 when beta == 0).
    unit = beta if beta > 0 else 1.0
    quadratic = torch.rand(shape, generator=g, dtype=dtype) < 0.5
    size = torch.where(
        quadratic,
        0.2 + 0.6 * torch.rand(shape, generator=g, dtype=dtype),
        1.2 + 1.3 * torch.rand(shape, generator=g, dtype=dtype),
    )
    sign = torch.where(torch.rand(shape, generator=g, dtype=dtype) < 0.5, -1.0, 1.0)
    x = target + sign * size * unit
    return x.detach().requires_grad_(), target.detach().requires_grad_()


def _smooth_l1_case(reduction: str, beta: float, shape: tuple[int, ...] = (3, 5)) -> OpCase:
    return OpCase(
        "smooth_l1_loss",
        f"{reduction}-beta{beta}" + ("" if shape == (3, 5) else f"-{'x'.join(map(str, shape))}"),
        ours=lambda x, t: smooth_l1_loss(x, t, beta, reduction),
        ref=lambda x, t: F.smooth_l1_loss(x, t, reduction=reduction, beta=beta),
        make_inputs=partial(_smooth_l1_inputs, shape, beta),
    )


CASES: list[OpCase] = [
    *(
        _ce_case(reduction, weighted, smoothing, ignore)
        for reduction, weighted, smoothing, ignore in itertools.product(
            REDUCTIONS, (False, True), (0.0, 0.2), (None, -100, 1)
        )
    ),
    _ce_case("mean", True, 1.0, None, name="mean-weighted-smooth1.0"),
    _ce_case("mean", True, 0.1, None, N=1, P=3, name="batch1-weighted-smooth0.1"),
    _ce_case("none", True, 0.1, 2, N=6, P=7, transpose=True, name="non-contiguous"),
    *(
        _bce_case(reduction, weighted, pos_weighted, target_grad)
        for reduction, weighted, pos_weighted, target_grad in itertools.product(
            REDUCTIONS, (False, True), (False, True), (False, True)
        )
    ),
    _bce_case("mean", True, True, True, shape=(1, 3), name="batch1"),
    _bce_case("none", True, True, True, transpose=True, name="non-contiguous"),
    _bce_case("sum", True, True, True, logit_scale=60.0, name="large-logits"),
    *(
        _smooth_l1_case(reduction, beta)
        for reduction, beta in itertools.product(REDUCTIONS, (0.0, 0.5, 1.0, 2.0))
    ),
    _smooth_l1_case("mean", 1.0, shape=(1, 1, 3, 3)),
]
