"""Fully connected layer: y = x @ weight^T + bias, with a hand-written backward.

x (N, *, D) (any number of leading dimensions, or just (D,)), weight (P, D), optional bias
(P,) -> y (N, *, P). The backward is three matmuls over the flattened positions
M = N * prod(*):  grad_x = grad_out @ weight          (M, P) @ (P, D)
                  grad_weight = grad_out^T @ x        (P, M) @ (M, D)
                  grad_bias = grad_out summed over M  (P,)
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from facetag.layers._util import init_like_torch, weight_and_bias


class LinearFn(torch.autograd.Function):
    """x (N, *, D), weight (P, D), bias (P,) or None -> y (N, *, P)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)  # grad_bias needs grad_out alone
        return F.linear(x, weight, bias)  # (N, *, P)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # y[m, p] = sum_d x[m, d] * weight[p, d] + bias[p], so dy[m, p]/dx[m, d] = weight[p, d]
        # and dy[m, p]/dweight[p, d] = x[m, d]; summing over the other index gives the three
        # matmuls below, with every leading dimension of x flattened into m.
        x, weight = ctx.saved_tensors
        P, D = weight.shape
        g = grad_out.reshape(-1, P)  # (M, P)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).view(x.shape)  # (M, D) -> (N, *, D)
        if ctx.needs_input_grad[1]:
            grad_weight = g.t() @ x.reshape(-1, D)  # (P, M) @ (M, D) -> (P, D)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)  # (P,)
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight^T + bias, as F.linear, with our backward.

    x (N, *, D) or (D,), weight (P, D), bias (P,) or None -> y (N, *, P) (or (P,)).
    """
    if weight.ndim != 2:
        raise ValueError(f"linear: expected weight of shape (P, D), got {tuple(weight.shape)}")
    P, D = weight.shape
    if x.ndim < 1 or x.shape[-1] != D:
        raise ValueError(
            f"linear: expected x of shape (N, *, {D}), got {tuple(x.shape)}; "
            f"check in_features (the weight is {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (P,):
        raise ValueError(f"linear: expected bias of shape ({P},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"linear: expected weight on x's {x.dtype} {x.device}, got {weight.dtype} "
            f"{weight.device}; move the module with .to(x)"
        )
    return cast(Tensor, LinearFn.apply(x, weight, bias))  # .apply is untyped


class Linear(nn.Module):
    """nn.Linear with our backward: same constructor, parameters and initialisation.

    weight (out_features, in_features), bias (out_features,), drawn as torch draws them, so
    ``ours.load_state_dict(twin.state_dict())`` works and the same seed gives the same values.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight: nn.Parameter
        self.bias: nn.Parameter | None
        weight_and_bias(self, (out_features, in_features), bias, factory)

    def reset_parameters(self) -> None:
        """torch's init (facetag.layers._util.init_like_torch)."""
        init_like_torch(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


FUNCTIONS = (LinearFn,)
