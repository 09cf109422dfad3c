"""OpCase, the finite-difference Jacobian and the comparison against torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

# The modules of this package that define CASES, in the order the table prints them.
FAMILIES = (
    "conv",
    "linear",
    "activation",
    "pool",
    "norm",
    "affine",
    "conv_affine",
    "fused",
    "dropout",
    "shape",
    "residual",
    "normalize",
    "loss",
    "margin",
)

FD_TOLERANCE = 1e-5  # float64 max |analytical - numerical|, as gradcheck's atol
TORCH_TOLERANCE = 1e-4  # float32 max relative difference against the torch.nn twin


@dataclass(frozen=True)
class OpCase:
    """One op under one configuration.

    ``make_inputs(dtype, generator)`` returns the positional tensor inputs (the ones to
    differentiate have ``requires_grad=True``); ``ours`` and ``ref`` take the same inputs,
    ``ours`` built from facetag.layers and ``ref`` from torch (the twin). ``gradcheck_inputs``
    may differ from the torch-comparison inputs when finite differences need smaller
    tensors or inputs kept away from kinks; by default both use ``make_inputs``.
    """

    op: str
    name: str
    ours: Callable[..., Tensor]
    ref: Callable[..., Tensor]
    make_inputs: Callable[[torch.dtype, torch.Generator], tuple[Tensor, ...]]
    make_gradcheck_inputs: Callable[[torch.dtype, torch.Generator], tuple[Tensor, ...]] | None = (
        field(default=None)
    )
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"


@dataclass(frozen=True)
class CaseResult:
    op: str
    name: str
    fd_error: float
    gradcheck_ok: bool
    torch_error: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and self.gradcheck_ok
            and self.fd_error <= FD_TOLERANCE
            and self.torch_error <= TORCH_TOLERANCE
        )


def all_cases(families: Sequence[str] = FAMILIES) -> list[OpCase]:
    """Every registered case, family by family."""
    cases: list[OpCase] = []
    for family in families:
        module = importlib.import_module(f"facetag.gradcheck.{family}")
        cases.extend(module.CASES)
    return cases


def _inputs(case: OpCase, dtype: torch.dtype, for_gradcheck: bool) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(case.seed)
    maker = case.make_gradcheck_inputs if for_gradcheck and case.make_gradcheck_inputs else None
    return (maker or case.make_inputs)(dtype, g)


def _flat_out(out: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(out, Tensor):
        return out.reshape(-1)
    return torch.cat([o.reshape(-1) for o in out])


def max_fd_error(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], eps: float = 1e-6) -> float:
    """Largest |J_analytical - J_numerical| over every differentiable input.

    J_numerical by central differences (one input element at a time); J_analytical one
    row at a time, by calling our backward with a one-hot upstream gradient.
    """
    diff_idx = [i for i, t in enumerate(inputs) if t.requires_grad]
    with torch.no_grad():
        out0 = _flat_out(fn(*inputs))
    M = out0.numel()
    worst = 0.0
    for i in diff_idx:
        x = inputs[i]
        numerical = torch.zeros(M, x.numel(), dtype=x.dtype)  # (M, |x|)
        flat = x.detach().reshape(-1)
        for k in range(x.numel()):
            base = flat[k].item()
            args_plus = list(inputs)
            args_minus = list(inputs)
            xp = flat.clone()
            xp[k] = base + eps
            xm = flat.clone()
            xm[k] = base - eps
            args_plus[i] = xp.view_as(x)
            args_minus[i] = xm.view_as(x)
            with torch.no_grad():
                numerical[:, k] = (_flat_out(fn(*args_plus)) - _flat_out(fn(*args_minus))) / (
                    2 * eps
                )
        analytical = torch.zeros_like(numerical)
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = fn(*leaves)
        outs = [out] if isinstance(out, Tensor) else list(out)
        for j in range(M):
            onehot = torch.zeros(M, dtype=out0.dtype)
            onehot[j] = 1.0
            grads_out: list[Tensor] = []
            offset = 0
            for o in outs:
                grads_out.append(onehot[offset : offset + o.numel()].view_as(o))
                offset += o.numel()
            (g,) = torch.autograd.grad(
                outs, [leaves[i]], grads_out, retain_graph=True, allow_unused=True
            )
            if g is not None:
                analytical[j] = g.reshape(-1)
        worst = max(worst, (analytical - numerical).abs().max().item() if M and x.numel() else 0.0)
    return worst


def _relative(a: Tensor, b: Tensor) -> float:
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    return (a - b).abs().max().item() / scale if b.numel() else 0.0


def torch_error(case: OpCase) -> float:
    """Largest relative difference (float32) of the output and every gradient vs the twin."""
    ours_in = _inputs(case, torch.float32, for_gradcheck=False)
    ref_in = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in ours_in)
    out = case.ours(*ours_in)
    expected = case.ref(*ref_in)
    outs = [out] if isinstance(out, Tensor) else list(out)
    exps = [expected] if isinstance(expected, Tensor) else list(expected)
    g = torch.Generator().manual_seed(case.seed + 1)
    # Random upstream gradients: all-ones would hide a transposed or mis-summed gradient.
    grads_out = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    worst = max(_relative(o.detach(), e.detach()) for o, e in zip(outs, exps, strict=True))
    diff = [t for t in ours_in if t.requires_grad]
    diff_ref = [t for t in ref_in if t.requires_grad]
    if diff:
        ga = torch.autograd.grad(outs, diff, grads_out, allow_unused=True)
        gb = torch.autograd.grad(exps, diff_ref, grads_out, allow_unused=True)
        for a, b in zip(ga, gb, strict=True):
            if a is None or b is None:
                if (a is None) != (b is None):
                    return float("inf")
                continue
            worst = max(worst, _relative(a, b))
    return worst


def run_case(case: OpCase) -> CaseResult:
    """Run one case; an exception inside the op is reported, not raised."""
    try:
        inputs = _inputs(case, torch.float64, for_gradcheck=True)
        ok = torch.autograd.gradcheck(case.ours, inputs, raise_exception=False)
        fd = max_fd_error(case.ours, inputs)
        te = torch_error(case)
        return CaseResult(case.op, case.name, fd, bool(ok), te)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        return CaseResult(case.op, case.name, float("nan"), False, float("nan"), error=str(e))


def run_cases(
    cases: Sequence[OpCase], on_result: Callable[[CaseResult], None] | None = None
) -> list[CaseResult]:
    results = []
    for case in cases:
        result = run_case(case)
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results
