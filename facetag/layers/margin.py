"""ArcFace head: cosine logits with an additive angular margin on the target class.

Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (CVPR 2019).
With x the embeddings and W the class centres (both L2-normalised), cos = x @ W^T and the
target class gets phi = cos(theta + m) instead of cos(theta), which pushes each embedding at
least a margin m (radians) closer to its own centre than the plain softmax would. Logits are
scaled by s before the cross-entropy.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from facetag.layers.normalize import l2_normalize


class CosineFn(torch.autograd.Function):
    """x (N, D), w (P, D), both with unit rows -> cos (N, P) = x @ w^T."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return x @ w.t()  # (N, P)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        grad_x = grad_out @ w if ctx.needs_input_grad[0] else None  # (N, D)
        grad_w = grad_out.t() @ x if ctx.needs_input_grad[1] else None  # (P, D)
        return grad_x, grad_w


def cosine(x: Tensor, w: Tensor) -> Tensor:
    """Cosine similarity of every row of x with every row of w, for unit-norm rows.

    x (N, D), w (P, D) -> (N, P) = x @ w^T (plain dot products if the rows are not unit).
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"cosine: expected x (N, D) and w (P, D) with the same D, got {tuple(x.shape)} "
            f"and {tuple(w.shape)}"
        )
    return cast(Tensor, CosineFn.apply(x, w))


class ArcMarginFn(torch.autograd.Function):
    """cos (N, P), labels (N,) int64 or None -> logits (N, P).

    logits = s * cos, except at [i, labels[i]] where it is s * phi(cos) with
        phi = cos*cos(m) - sin*sin(m) = cos(theta + m),    sin = sqrt(clamp(1 - cos^2, 0, 1)),
    replaced by cos - m*sin(m) where cos <= cos(pi - m) (theta + m would pass pi and phi
    would grow again), or by cos where cos <= 0 with easy_margin.
    """

    @staticmethod
    def forward(
        ctx: Any,
        cos: Tensor,
        labels: Tensor | None,
        scale: float,
        margin: float,
        easy_margin: bool,
    ) -> Tensor:
        ctx.scale, ctx.margin, ctx.easy_margin = scale, margin, easy_margin
        logits = cos * scale  # (N, P)
        if labels is None:
            ctx.save_for_backward(None, None)
            return logits
        cos_t = cos.gather(1, labels[:, None])  # (N, 1), the target class's cosine
        sin_t = (1 - cos_t * cos_t).clamp(0, 1).sqrt()
        phi = cos_t * math.cos(margin) - sin_t * math.sin(margin)
        if easy_margin:
            phi = torch.where(cos_t > 0, phi, cos_t)
        else:
            threshold = math.cos(math.pi - margin)
            phi = torch.where(cos_t > threshold, phi, cos_t - math.sin(math.pi - margin) * margin)
        logits.scatter_(1, labels[:, None], phi * scale)
        ctx.save_for_backward(cos_t, labels)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        # Off the target, d logit / d cos = s. On it, inside the margin branch,
        #     dphi/dcos = cos(m) - sin(m) * dsin/dcos = cos(m) + sin(m) * cos / sin,
        # and 1 in the fallback branch.
        # NOTE: at |cos| == 1 exactly (sin == 0) the reference's autograd (sqrt of a clamp)
        # gives inf or nan; we drop the sin term there, as the clamp does for |cos| > 1
        # (rounding makes both happen), so the gradient stays finite: s*cos(m).
        cos_t, labels = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        scale, margin = ctx.scale, ctx.margin
        grad_cos = grad_out * scale  # (N, P)
        if labels is None:
            return grad_cos, None, None, None, None
        sin_sq = 1 - cos_t * cos_t  # (N, 1)
        inside = (sin_sq > 0) & (sin_sq <= 1)
        ratio = torch.where(inside, cos_t / sin_sq.clamp(0, 1).sqrt(), 0.0)  # where, not *
        dphi = math.cos(margin) + math.sin(margin) * ratio  # (N, 1)
        if ctx.easy_margin:
            dphi = torch.where(cos_t > 0, dphi, 1.0)
        else:
            dphi = torch.where(cos_t > math.cos(math.pi - margin), dphi, 1.0)
        grad_t = grad_out.gather(1, labels[:, None]) * (scale * dphi)  # (N, 1)
        grad_cos.scatter_(1, labels[:, None], grad_t)
        return grad_cos, None, None, None, None


def arc_margin(
    cos: Tensor,
    labels: Tensor | None,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
) -> Tensor:
    """Additive angular margin on the target class, then scale (see ArcMarginFn).

    cos (N, P) in [-1, 1], labels (N,) int64 in [0, P) or None -> logits (N, P); without
    labels (inference) the logits are s * cos.
    """
    if cos.ndim != 2:
        raise ValueError(f"arc_margin: expected cos of shape (N, P), got {tuple(cos.shape)}")
    N, P = cos.shape
    if labels is not None:
        if labels.shape != (N,) or labels.dtype != torch.int64:
            raise ValueError(
                f"arc_margin: expected labels of shape ({N},) and dtype int64, got "
                f"{tuple(labels.shape)} {labels.dtype}; use .long()"
            )
        if N and not bool(((labels >= 0) & (labels < P)).all()):
            raise ValueError(
                f"arc_margin: expected labels in [0, {P}), got values from "
                f"{labels.min().item()} to {labels.max().item()}"
            )
    if not 0 <= margin < math.pi / 2:
        raise ValueError(f"arc_margin: expected 0 <= margin < pi/2, got margin={margin}")
    return cast(Tensor, ArcMarginFn.apply(cos, labels, scale, margin, easy_margin))


class ArcMarginHead(nn.Module):
    """Embeddings (N, D) and labels (N,) -> ArcFace logits (N, P) for cross_entropy.

    Holds the class centres weight (P, D) (Xavier-uniform, as the common ArcFace code).
    Without labels it returns s * cos, the plain scaled cosine logits for inference.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"ArcMarginHead: expected 0 <= margin < pi/2, got margin={margin}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.scale = scale
        self.margin = margin
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.in_features:
            raise ValueError(
                f"ArcMarginHead: expected embeddings of shape (N, {self.in_features}), "
                f"got {tuple(embeddings.shape)}"
            )
        cos = cosine(l2_normalize(embeddings, dim=1), l2_normalize(self.weight, dim=1))  # (N, P)
        return arc_margin(cos, labels, self.scale, self.margin, self.easy_margin)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"scale={self.scale}, margin={self.margin}, easy_margin={self.easy_margin}"
        )


FUNCTIONS = (CosineFn, ArcMarginFn)
