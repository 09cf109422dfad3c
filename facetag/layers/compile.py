"""torch.compile for an op's formulas, with the eager formulas as the fallback.

A fused op (facetag.layers.fused) writes its forward and backward as plain functions of
tensors; ``MaybeCompiled`` runs them through torch.compile when that pays (one graph per
variant key) and eagerly otherwise, so the maths stays readable in the op's own module.
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch


def _own_code_copy(fn: Callable[..., Any], tag: str) -> Callable[..., Any]:
    """fn with a code object of its own.

    NOTE: torch.compile keeps its graphs, and its limit of 8 recompiles, per code object;
    each (activation, statistics) pair is a different graph, so each gets its own copy and
    the layouts, dtypes and affine options of one pair share the 8.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def quiet_cpp_extension() -> None:
    """Keep torch's "No CUDA runtime is found, using CUDA_HOME=..." off users' stderr.

    NOTE: torch.compile's CPU backend imports torch.utils.cpp_extension, which logs that
    warning on any machine with a CUDA toolkit but no GPU: true, and of no use to someone
    tagging photos on a CPU. Its errors still show.
    """
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class MaybeCompiled:
    """``fn`` through torch.compile (built on first use, one per key) or eagerly.

    A compile failure (no C++ compiler for the CPU backend, no triton for CUDA, the
    recompile limit) warns once and turns compiling off for that key; the eager formulas
    are the same maths.
    """

    def __init__(self, fn: Callable[..., Any], op: str) -> None:
        self.fn, self.op = fn, op  # op: the facetag op it serves, named in the warning
        self.compiled: dict[str, Callable[..., Any]] = {}
        self.failures: dict[str, str] = {}

    def __call__(self, key: str | None, *args: Any) -> Any:
        if key is None or key in self.failures or torch.compiler.is_compiling():
            return self.fn(*args)
        # Imported here: importing torch._dynamo costs time that eager users never need.
        from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

        if key not in self.compiled:
            quiet_cpp_extension()
            fn = _own_code_copy(self.fn, key)
            self.compiled[key] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return self.compiled[key](*args)
        except (TorchDynamoException, FailOnRecompileLimitHit, OSError) as e:
            lines = str(e).strip().splitlines()
            self.failures[key] = lines[0] if lines else type(e).__name__
            warnings.warn(
                f"{self.op}: torch.compile failed for {self.fn.__name__} ({key}): "
                f"{self.failures[key]}; using the eager formulas, which are slower",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(*args)
