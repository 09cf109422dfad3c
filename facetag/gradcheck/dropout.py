"""Gradient checks for dropout.

The mask is random, so every call re-seeds a private copy of the generator state: ours and
torch's F.dropout then draw the same mask (on CPU), and finite differences see one fixed
mask, which makes the op linear in x.

NOTE: the mask is drawn in x's memory order (as torch's), so the same values in another
layout get another mask; finite differences perturb a contiguous copy, so non-contiguous
inputs are checked against torch in tests/layers/test_dropout.py instead.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from facetag.gradcheck.core import OpCase
from facetag.layers.dropout import dropout

MASK_SEED = 1234


def _seeded(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """fn run with the default generator seeded to MASK_SEED, restored afterwards."""

    def run(x: Tensor) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MASK_SEED)
            return fn(x)

    return run


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> tuple[Tensor]:
    return (torch.randn(shape, generator=g, dtype=dtype, requires_grad=True),)


def _case(
    name: str,
    shape: tuple[int, ...],
    p: float,
    training: bool = True,
    inplace: bool = False,
) -> OpCase:
    def ours(x: Tensor) -> Tensor:
        # In-place dropout cannot write into a leaf that requires grad: work on a copy.
        return dropout(x.clone() if inplace else x, p, training, inplace)

    def ref(x: Tensor) -> Tensor:
        return F.dropout(x.clone() if inplace else x, p, training, inplace)

    return OpCase(
        "dropout",
        name,
        ours=_seeded(ours),
        ref=_seeded(ref),
        make_inputs=partial(_inputs, shape),
    )


CASES: list[OpCase] = [
    _case("p0.3", (2, 3, 4, 4), 0.3),
    _case("p0.5-batch1-odd", (1, 5, 3), 0.5),
    _case("p0.9-embeddings", (4, 16), 0.9),
    _case("p0.3-inplace", (2, 3, 4, 4), 0.3, inplace=True),
    _case("p0-identity", (2, 8), 0.0),
    _case("p1-all-dropped", (2, 8), 1.0),
    _case("p1-all-dropped-inplace", (2, 8), 1.0, inplace=True),
    _case("eval", (2, 3, 4, 4), 0.5, training=False),
]
