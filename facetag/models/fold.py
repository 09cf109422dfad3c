"""Inference copies of our networks with BatchNorm folded into the preceding layer.

In eval mode BatchNorm is a fixed per-channel affine, y = x * s + t with
s = gamma / sqrt(running_var + eps) and t = beta - running_mean * s, so a convolution
(or Linear) followed by it equals one convolution with weight W * s[f] and bias
b * s + t. The folded copy runs one pass less per stage; torch.nn eager does not do this.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from facetag.layers import BatchNorm1d, BatchNorm2d, BatchNormAct2d, Conv2d, Linear


def _scale_shift(bn: BatchNorm1d | BatchNorm2d) -> tuple[Tensor, Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_batchnorm: expected BatchNorm with running statistics, got "
            "track_running_stats=False"
        )
    s = torch.rsqrt(bn.running_var + bn.eps)  # (F,)
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s  # (F,)
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


@torch.no_grad()
def _fold_into(layer: Conv2d | Linear, bn: BatchNorm1d | BatchNorm2d) -> None:
    s, t = _scale_shift(bn)
    shape = (-1,) + (1,) * (layer.weight.ndim - 1)  # (F, 1, 1, 1) or (F, 1)
    layer.weight.mul_(s.view(shape))
    bias = t if layer.bias is None else layer.bias * s + t
    layer.bias = nn.Parameter(bias.clone())


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in which every Conv2d -> BatchNorm(+activation) and
    Linear -> BatchNorm1d pair is one layer. ``model`` itself is not changed.

    Pairs are found among sibling attributes named in order: a module with a ``conv``
    followed by ``norm_act`` (ConvStage), and ``fc`` followed by ``bn`` (EmbeddingNet).
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        conv, norm_act = getattr(module, "conv", None), getattr(module, "norm_act", None)
        if isinstance(conv, Conv2d) and isinstance(norm_act, BatchNormAct2d):
            _fold_into(conv, norm_act.bn)
            module.norm_act = norm_act.act  # the activation alone
        fc, bn = getattr(module, "fc", None), getattr(module, "bn", None)
        if isinstance(fc, Linear) and isinstance(bn, BatchNorm1d):
            _fold_into(fc, bn)
            module.bn = nn.Identity()
    return folded
