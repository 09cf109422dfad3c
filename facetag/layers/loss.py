"""Losses: softmax cross-entropy, binary cross-entropy with logits, smooth L1.

Each matches its torch.nn.functional twin, reductions and options included. ``reduction``
is "mean" (the default), "sum" or "none" (one loss per sample or element).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{op}: expected reduction to be one of {', '.join(map(repr, REDUCTIONS))}, "
            f"got {reduction!r}"
        )


def _check_not_differentiable(op: str, name: str, t: Tensor | None) -> None:
    """torch's losses have no gradient for their weights: refuse one that requires grad."""
    if t is not None and t.requires_grad:
        raise ValueError(
            f"{op}: expected {name} that does not require grad (the loss is not "
            f"differentiable in it), got one that does; pass {name}.detach()"
        )


class CrossEntropyFn(torch.autograd.Function):
    """logits (N, P), target (N,) int64 -> loss () or (N,) for reduction="none".

    Per sample i with target t (w = class weights, all ones if None, eps = label smoothing):
        loss_i = -(1 - eps) * w[t] * logp[i, t] - (eps / P) * sum_c w[c] * logp[i, c]
    and 0 where t == ignore_index. "mean" divides the sum by sum_i w[t_i] over the samples
    not ignored (torch's weighted mean), "sum" does not divide.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> Tensor:
        P = logits.shape[1]
        logp = torch.log_softmax(logits, dim=1)  # (N, P), stable: z - max - log sum exp
        valid = target != ignore_index  # (N,)
        safe_target = torch.where(valid, target, 0)  # (N,), a real class to gather from
        if weight is None:
            w_target = valid.to(logits.dtype)  # (N,)
        else:
            w_target = torch.where(valid, weight[safe_target], 0.0)  # (N,)
        nll = -logp.gather(1, safe_target[:, None]).squeeze(1) * w_target  # (N,)
        eps = label_smoothing
        total = w_target.sum() if reduction == "mean" else None  # (), torch's weighted count
        denom = 1.0 if total is None else total
        loss = nll if reduction == "none" else nll.sum() / denom  # (N,) or ()
        if eps > 0:
            # The uniform part of the smoothed target weighs every class by w[c] (as torch).
            smooth = -(logp.sum(1) if weight is None else (logp * weight).sum(1))  # (N,)
            smooth = torch.where(valid, smooth, 0.0)
            smooth_loss = smooth if reduction == "none" else smooth.sum() / denom
            loss = (1 - eps) * loss + (eps / P) * smooth_loss
        ctx.reduction, ctx.eps = reduction, eps
        ctx.save_for_backward(logp, safe_target, valid, w_target, weight, total)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # With target distribution q_i (the (1 - eps) * w[t] one-hot plus eps/P * w) the loss
        # is -sum_c q_ic logp_ic; d logp_ic / d z_ij = delta_cj - softmax_ij, so
        #     dloss_i / dz_i = softmax_i * sum_c q_ic - q_i,
        # which is softmax minus the one-hot for unweighted, unsmoothed targets.
        logp, safe_target, valid, w_target, weight, total = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        N, P = logp.shape
        eps = ctx.eps
        q_sum = (1 - eps) * w_target  # (N,)
        if eps > 0:
            weight_sum = P if weight is None else weight.sum()
            q_sum = q_sum + torch.where(valid, (eps / P) * weight_sum, 0.0)
        grad_logits = logp.exp() * q_sum[:, None]  # (N, P)
        if eps > 0:
            grad_logits = grad_logits - (eps / P) * (1.0 if weight is None else weight)
        grad_logits.scatter_add_(1, safe_target[:, None], -(1 - eps) * w_target[:, None])
        if ctx.reduction == "none":
            scale = grad_out  # (N,)
        elif ctx.reduction == "sum":
            scale = grad_out.expand(N)
        else:
            scale = (grad_out / total).expand(N)
        # where, not a product: an ignored row must stay 0 even if the scale is inf or nan.
        scale = torch.where(valid, scale, 0.0)  # (N,)
        grad_logits = torch.where(valid[:, None], grad_logits * scale[:, None], 0.0)
        return grad_logits, None, None, None, None, None


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """F.cross_entropy for class-index targets, fused: log-softmax and NLL in one op.

    logits (N, P), target (N,) int64 in [0, P) or ignore_index, weight (P,) or None ->
    loss () for "mean"/"sum", (N,) for "none". As in torch, weight may not require grad.
    """
    if logits.ndim != 2:
        raise ValueError(
            f"cross_entropy: expected logits of shape (N, P), got {tuple(logits.shape)}"
        )
    N, P = logits.shape
    if target.shape != (N,) or target.dtype != torch.int64:
        raise ValueError(
            f"cross_entropy: expected target of shape ({N},) and dtype int64 to match logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)} {target.dtype}; use .long()"
        )
    if weight is not None and weight.shape != (P,):
        raise ValueError(
            f"cross_entropy: expected weight of shape ({P},), got {tuple(weight.shape)}"
        )
    _check_not_differentiable("cross_entropy", "weight", weight)
    _check_reduction("cross_entropy", reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"cross_entropy: expected 0 <= label_smoothing <= 1, got {label_smoothing}"
        )
    in_range = (target >= 0) & (target < P)
    if not bool(((target == ignore_index) | in_range).all()):
        bad = target[~in_range & (target != ignore_index)][0].item()
        raise ValueError(
            f"cross_entropy: expected targets in [0, {P}) or ignore_index={ignore_index}, got {bad}"
        )
    return cast(
        Tensor,
        CrossEntropyFn.apply(logits, target, weight, ignore_index, reduction, label_smoothing),
    )


class CrossEntropyLoss(nn.Module):
    """nn.CrossEntropyLoss (class-index targets); weight is a buffer as in torch.

    The options after weight are keyword-only: torch's deprecated size_average and reduce
    sit between them positionally, so a positional call would silently differ.
    """

    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        _check_reduction("CrossEntropyLoss", reduction)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            logits, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _scale(grad_out: Tensor, reduction: str, numel: int) -> Tensor:
    """Upstream gradient per element: grad_out itself for "none", else a 0-d scale."""
    return grad_out / numel if reduction == "mean" else grad_out


class BCEWithLogitsFn(torch.autograd.Function):
    """logits x, target t (same shape) -> loss () or, for "none", the shape of x.

    With lw = 1 + (pos_weight - 1) * t (1 without pos_weight) and weight w (1 if None):
        loss = w * ((1 - t) * x - lw * log(sigmoid(x)))
    which is -w * (pos_weight * t * log(sigmoid(x)) + (1 - t) * log(1 - sigmoid(x))) written
    with log-sigmoid, finite for any |x|.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        pos_weight: Tensor | None,
        reduction: str,
    ) -> Tensor:
        log_sig = F.logsigmoid(logits)  # log(sigmoid(x)) = -softplus(-x), stable
        if pos_weight is not None:
            log_sig = log_sig * ((pos_weight - 1) * target + 1)
        loss = (1 - target) * logits - log_sig  # same shape as x
        if weight is not None:
            loss = loss * weight
        ctx.reduction = reduction
        ctx.save_for_backward(logits, target, weight, pos_weight)
        return _reduce(loss, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # d/dx: (1 - t) - lw * (1 - sigmoid(x)) = lw * sigmoid(x) - pos_weight * t
        #       (sigmoid(x) - t without pos_weight);
        # d/dt: -x - (pos_weight - 1) * log(sigmoid(x))
        #       = log(sigmoid(-x)) - pos_weight * log(sigmoid(x))   (-x without pos_weight).
        logits, target, weight, pos_weight = ctx.saved_tensors
        scale = _scale(grad_out, ctx.reduction, logits.numel())
        if weight is not None:
            scale = scale * weight
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            if pos_weight is None:
                grad_logits = torch.sigmoid(logits) - target
            else:
                pos = pos_weight * target
                grad_logits = (pos + 1 - target) * torch.sigmoid(logits) - pos
            grad_logits = grad_logits * scale  # shape of x
        if ctx.needs_input_grad[1]:
            if pos_weight is None:
                grad_target = -logits
            else:
                grad_target = F.logsigmoid(-logits) - pos_weight * F.logsigmoid(logits)
            grad_target = grad_target * scale  # shape of t
        return grad_logits, grad_target, None, None, None


def _check_broadcast(op: str, name: str, t: Tensor | None, shape: torch.Size) -> None:
    if t is None:
        return
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{op}: expected {name} broadcastable to the logits' shape {tuple(shape)}, "
            f"got {tuple(t.shape)}"
        )


def binary_cross_entropy_with_logits(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """F.binary_cross_entropy_with_logits: sigmoid and binary cross-entropy in one stable op.

    logits x and target t of the same shape (any); weight broadcastable to it (per element),
    pos_weight broadcastable to it (per class, along the last dim) -> loss () for
    "mean"/"sum", x's shape for "none". Gradients flow to x and t; as in torch, the weights
    may not require grad.
    """
    op = "binary_cross_entropy_with_logits"
    if target.shape != logits.shape:
        raise ValueError(
            f"{op}: expected target of the logits' shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    _check_broadcast(op, "weight", weight, logits.shape)
    _check_broadcast(op, "pos_weight", pos_weight, logits.shape)
    _check_not_differentiable(op, "weight", weight)
    _check_not_differentiable(op, "pos_weight", pos_weight)
    _check_reduction(op, reduction)
    return cast(Tensor, BCEWithLogitsFn.apply(logits, target, weight, pos_weight, reduction))


class BCEWithLogitsLoss(nn.Module):
    """nn.BCEWithLogitsLoss; weight and pos_weight are buffers as in torch.

    Options are keyword-only (torch's deprecated size_average and reduce sit between them).
    """

    weight: Tensor | None
    pos_weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        _check_reduction("BCEWithLogitsLoss", reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(
            logits, target, self.weight, self.pos_weight, self.reduction
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class SmoothL1Fn(torch.autograd.Function):
    """x, t (same shape) -> loss () or, for "none", the shape of x.

    With d = x - t: 0.5 * d**2 / beta where |d| < beta, else |d| - 0.5 * beta (Huber loss
    divided by beta); beta == 0 is the L1 loss |d|.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, target: Tensor, beta: float, reduction: str) -> Tensor:
        diff = x - target
        abs_diff = diff.abs()
        if beta == 0:
            loss = abs_diff
        else:
            loss = torch.where(
                abs_diff < beta, 0.5 * abs_diff * abs_diff / beta, abs_diff - 0.5 * beta
            )
        ctx.beta, ctx.reduction = beta, reduction
        ctx.save_for_backward(diff)
        return _reduce(loss, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # dloss/dd = d / beta inside the quadratic zone, sign(d) outside it; torch takes the
        # linear branch at |d| == beta (both give +-1 there) and sign(0) = 0 for L1.
        (diff,) = ctx.saved_tensors
        beta = ctx.beta
        grad_diff = torch.sign(diff)
        if beta != 0:
            grad_diff = torch.where(diff.abs() < beta, diff / beta, grad_diff)
        grad_diff = grad_diff * _scale(grad_out, ctx.reduction, diff.numel())  # shape of x
        grad_x = grad_diff if ctx.needs_input_grad[0] else None
        grad_target = -grad_diff if ctx.needs_input_grad[1] else None
        return grad_x, grad_target, None, None


def smooth_l1_loss(x: Tensor, target: Tensor, beta: float = 1.0, reduction: str = "mean") -> Tensor:
    """F.smooth_l1_loss: quadratic for |x - t| < beta, linear beyond; beta=0 is L1.

    x and target of the same shape (any) -> loss () for "mean"/"sum", x's shape for "none".
    Gradients flow to both x and target.
    """
    if target.shape != x.shape:
        raise ValueError(
            f"smooth_l1_loss: expected target of x's shape {tuple(x.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: expected beta >= 0, got beta={beta}")
    _check_reduction("smooth_l1_loss", reduction)
    return cast(Tensor, SmoothL1Fn.apply(x, target, beta, reduction))


class SmoothL1Loss(nn.Module):
    """nn.SmoothL1Loss; options keyword-only (torch's deprecated arguments come first)."""

    def __init__(self, *, reduction: str = "mean", beta: float = 1.0) -> None:
        super().__init__()
        _check_reduction("SmoothL1Loss", reduction)
        self.reduction = reduction
        self.beta = beta

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return smooth_l1_loss(x, target, self.beta, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, beta={self.beta}"


FUNCTIONS = (CrossEntropyFn, BCEWithLogitsFn, SmoothL1Fn)
