"""Activations: ReLU, LeakyReLU and PReLU, each forward beside its derivative.

All three are ``y = x`` for ``x > 0`` and ``y = slope * x`` otherwise (ReLU: slope 0;
LeakyReLU: a constant slope; PReLU: a learnt slope per channel), so all three have
``dy/dx = 1`` for ``x > 0`` and ``slope`` otherwise. At exactly ``x == 0`` we take the
``slope`` side, as torch does (ReLU's gradient at 0 is 0, LeakyReLU's and PReLU's is the
slope). Shapes are unchanged: x (N, C, *) -> y (N, C, *).
"""

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from facetag.layers._util import channel_view
from facetag.layers.norm import channel_dot


def _step(x: Tensor, out: Tensor | None = None) -> Tensor:
    """1.0 where x > 0, else 0.0 (also at x == 0: the slope side, torch's convention).

    x (N, *) -> (N, *); ``out`` may be x itself. sign then clamp: two vectorised passes,
    several times faster on a CPU than a bool mask fed to torch.where.
    """
    return torch.sign(x, out=out).clamp_(min=0)


def _slope(x: Tensor, slope: Tensor, out: Tensor | None = None) -> Tensor:
    """dy/dx of y = x if x > 0 else slope * x: 1 where x > 0, else slope (also at 0).

    x (N, *); slope 0-d or broadcastable (1, P, 1, ...) -> (N, *); ``out`` may be x.
    lerp from slope to 1 by the 0/1 step is exact at both ends (a + (1 - a) * step is
    not), so the x > 0 side passes grad_out through bit for bit, as torch does.
    """
    step = _step(x, out)
    return torch.lerp(slope, slope.new_ones(()), step, out=step)


def relu_backward(grad_out: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """grad_x of ReLU: grad_out where y > 0, else 0. grad_out, y (N, *) -> (N, *).

    ``y`` is ReLU's output or its input (same sign). ``out``, when given, receives the
    result and may be ``y`` itself.
    """
    return _step(y, out).mul_(grad_out)


def leaky_relu_backward(
    grad_out: Tensor, x: Tensor, negative_slope: float, out: Tensor | None = None
) -> Tensor:
    """grad_x of LeakyReLU: grad_out where x > 0, else negative_slope * grad_out.

    grad_out, x (N, *) -> (N, *). ``x`` may also be the output when negative_slope >= 0 (the
    sign is the same). ``out``, when given, receives the result and may be ``x`` itself.
    """
    return _slope(x, x.new_full((), negative_slope), out).mul_(grad_out)


def prelu_input_grad(
    grad_out: Tensor, x: Tensor, weight: Tensor, out: Tensor | None = None
) -> Tensor:
    """grad_x of PReLU: grad_out * (1 if x > 0 else weight[c]).

    grad_out, x (N, C, *) or (N,); weight (P,) -> (N, C, *). ``out`` may be x itself.
    """
    return _slope(x, channel_view(weight, x.ndim), out).mul_(grad_out)


def prelu_weight_grad(
    grad_out: Tensor, x: Tensor, num_parameters: int, scratch: Tensor | None = None
) -> Tensor:
    """grad_weight of PReLU: sum over n, * of grad_out * min(x, 0), per channel.

    grad_out, x (N, C, *) or (N,) -> (P,) with P == num_parameters (1 or C). ``scratch``,
    a buffer like x that receives min(x, 0), may be x itself (which is then lost).
    """
    if x.ndim == 1:  # no channel dim: one slope for everything, see torch.nn.PReLU
        grad_out, x = grad_out.view(-1, 1), x.view(-1, 1)  # (N, 1)
        scratch = None if scratch is None else scratch.view(-1, 1)
    negative = torch.clamp(x, max=0, out=scratch)  # (N, C, *): x > 0 contributes nothing
    grad_weight = channel_dot(grad_out, negative)  # (C,)
    return grad_weight.sum().view(1) if num_parameters == 1 else grad_weight


def prelu_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    need_x: bool = True,
    need_weight: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of PReLU y = x if x > 0 else weight[c] * x.

    grad_out, x (N, C, *) or (N,); weight (P,) with P == 1 or P == C.
    Returns grad_x (like x) and grad_weight (P,); either is None when not needed.
    One full-size buffer serves both: min(x, 0) first, then grad_x.
    """
    grad_x = grad_weight = buf = None
    if need_weight:
        buf = torch.empty_like(x)  # (N, C, *)
        grad_weight = prelu_weight_grad(grad_out, x, weight.numel(), scratch=buf)
    if need_x:
        grad_x = prelu_input_grad(grad_out, x, weight, out=buf)
    return grad_x, grad_weight


class ReLUFn(torch.autograd.Function):
    """x (N, *) -> y = max(x, 0) (N, *); in place on x when ``inplace``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            out = x.clamp_(min=0)
            ctx.mark_dirty(x)
        else:
            out = x.clamp(min=0)
        ctx.save_for_backward(out)  # the output holds the sign: out > 0 iff x > 0
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (out,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = relu_backward(grad_out, out)
        return grad_x, None


def relu(x: Tensor, inplace: bool = False) -> Tensor:
    """max(x, 0) elementwise; x (*) -> (*). Gradient at exactly 0 is 0, like torch."""
    if not x.is_floating_point():
        raise ValueError(f"relu: expected a floating-point x, got dtype {x.dtype}")
    return cast(Tensor, ReLUFn.apply(x, inplace))


class ReLU(nn.Module):
    """Module form of :func:`relu` (same constructor as torch.nn.ReLU)."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return relu(x, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class LeakyReLUFn(torch.autograd.Function):
    """x (N, *) -> y = x if x > 0 else negative_slope * x (N, *)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, negative_slope: float, inplace: bool) -> Tensor:
        if inplace:
            out = torch.nn.functional.leaky_relu_(x, negative_slope)
            ctx.mark_dirty(x)
            ctx.save_for_backward(out)  # same sign as x because negative_slope >= 0
        else:
            out = torch.nn.functional.leaky_relu(x, negative_slope)
            ctx.save_for_backward(x)
        ctx.negative_slope = negative_slope
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = leaky_relu_backward(grad_out, x, ctx.negative_slope)
        return grad_x, None, None


def leaky_relu(x: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """x if x > 0 else negative_slope * x; x (*) -> (*). Gradient at 0 is negative_slope."""
    if not x.is_floating_point():
        raise ValueError(f"leaky_relu: expected a floating-point x, got dtype {x.dtype}")
    if inplace and negative_slope < 0 and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"leaky_relu: expected negative_slope >= 0 with inplace=True (the backward reads "
            f"the sign of x from the output), got {negative_slope}; use inplace=False"
        )
    return cast(Tensor, LeakyReLUFn.apply(x, float(negative_slope), inplace))


class LeakyReLU(nn.Module):
    """Module form of :func:`leaky_relu` (same constructor as torch.nn.LeakyReLU)."""

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__()
        self.negative_slope = negative_slope
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return leaky_relu(x, self.negative_slope, self.inplace)

    def extra_repr(self) -> str:
        inplace_str = ", inplace=True" if self.inplace else ""
        return f"negative_slope={self.negative_slope}{inplace_str}"


class PReLUFn(torch.autograd.Function):
    """x (N, C, *) or (N,), weight (P,) with P in {1, C} -> y like x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)  # the output alone loses x's sign when weight <= 0
        return torch.prelu(x, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        return prelu_backward(grad_out, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def prelu(x: Tensor, weight: Tensor) -> Tensor:
    """x if x > 0 else weight[c] * x, with c the channel (dim 1; a 1-d x has one channel).

    x (N, C, *) or (N,); weight (P,) with P == 1 (shared) or P == C -> y like x.
    """
    channels = x.shape[1] if x.ndim >= 2 else 1
    if x.ndim == 0 or not x.is_floating_point():
        raise ValueError(
            f"prelu: expected a floating-point x of shape (N, C, *) or (N,), got "
            f"{tuple(x.shape)} of dtype {x.dtype}"
        )
    if weight.ndim != 1 or weight.numel() not in (1, channels):
        raise ValueError(
            f"prelu: expected weight of shape (1,) or ({channels},) for x of shape "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}; set num_parameters to 1 or to "
            f"the channel count {channels}"
        )
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"prelu: expected weight on {x.device} with dtype {x.dtype} like x, got "
            f"{weight.device} and {weight.dtype}; move the module with .to(x)"
        )
    return cast(Tensor, PReLUFn.apply(x, weight))


class PReLU(nn.Module):
    """Module form of :func:`prelu` (same constructor and ``weight`` as torch.nn.PReLU)."""

    def __init__(
        self,
        num_parameters: int = 1,
        init: float = 0.25,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_parameters = num_parameters
        self.init = init
        self.weight = nn.Parameter(torch.empty(num_parameters, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init)

    def forward(self, x: Tensor) -> Tensor:
        return prelu(x, self.weight)

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}"


FUNCTIONS = (ReLUFn, LeakyReLUFn, PReLUFn)
