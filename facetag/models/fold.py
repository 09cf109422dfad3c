"""Inference copies of our networks: BatchNorm folded into the preceding layer, and max
pooling moved before a non-decreasing activation.

In eval mode BatchNorm is a fixed per-channel affine, y = x * s + t with
s = gamma / sqrt(running_var + eps) and t = beta - running_mean * s, so a convolution
(or Linear) followed by it equals one convolution with weight W * s[f] and bias
b * s + t. The folded copy runs one pass less per stage; torch.nn eager does not do this.

A max pool commutes with a non-decreasing activation f: max_i f(x_i) = f(max_i x_i), so
``conv -> f -> max pool`` equals ``conv -> max pool -> f`` (ConvPoolAct), which runs f on
the pooled map (a quarter of the elements after a 2x2 pool) and lets the pool write into
the conv's output, a temporary nobody else reads. ReLU, and LeakyReLU and PReLU with
slopes >= 0, are non-decreasing; a PReLU with a negative slope is not (its block keeps
its order).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from facetag.layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNormAct2d,
    Conv2d,
    LeakyReLU,
    Linear,
    MaxPool2d,
    PReLU,
    ReLU,
)
from facetag.layers._util import memory_format, pair
from facetag.layers.pool import max_pool_no_argmax
from facetag.models.embedder import ConvStage


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
    for module in list(folded.modules()):
        conv, norm_act = getattr(module, "conv", None), getattr(module, "norm_act", None)
        if isinstance(conv, Conv2d) and isinstance(norm_act, BatchNormAct2d):
            _fold_into(conv, norm_act.bn)
            module.norm_act = norm_act.act  # the activation alone
        fc, bn = getattr(module, "fc", None), getattr(module, "bn", None)
        if isinstance(fc, Linear) and isinstance(bn, BatchNorm1d):
            _fold_into(fc, bn)
            module.bn = nn.Identity()
    for module in list(folded.modules()):
        for name, child in module.named_children():
            if isinstance(child, ConvStage):  # conv -> norm_act -> pool
                fused = conv_pool_act(child.conv, child.norm_act, child.pool)
                if fused is not None:
                    setattr(module, name, fused)
    return folded


def nondecreasing(act: nn.Module) -> bool:
    """True when act(x) never decreases as x grows: ReLU, and LeakyReLU or PReLU whose
    slopes are all >= 0."""
    if isinstance(act, ReLU):
        return True
    if isinstance(act, LeakyReLU):
        return act.negative_slope >= 0
    if isinstance(act, PReLU):
        return bool((act.weight >= 0).all())
    return False


# Bytes of conv output computed per block in ConvPoolAct: the block is pooled while it is
# still in cache, and blocks of this size come from the heap rather than from fresh
# mmap'ed pages (glibc maps anything over 32 MiB anew, a page fault per 4 KiB). A 2x2-pooled
# 64x32x96x96 layer took 35 ms whole and 12 in 8 MiB blocks here (experiments/LOG.md).
BLOCK_BYTES = 8 << 20


class ConvPoolAct(nn.Module):
    """conv -> max pool -> act: the inference form of conv -> act -> max pool for a
    non-decreasing act (module docstring). x (N, C, H, W) -> (N, F, H_out, W_out).

    Without autograd recording, the batch runs (on the CPU) in blocks of about BLOCK_BYTES
    of conv output, and the pool writes into that output, a temporary nobody else reads
    (facetag.layers.pool.max_pool_no_argmax's scratch): the largest map of the network is
    never allocated whole.
    """

    def __init__(self, conv: Conv2d, pool: MaxPool2d, act: nn.Module) -> None:
        super().__init__()
        if not nondecreasing(act):
            raise ValueError(
                f"ConvPoolAct: expected a non-decreasing activation (ReLU, or LeakyReLU or "
                f"PReLU with slopes >= 0), got {act}; keep the activation before the pool"
            )
        if not _plain_max_pool(pool):
            raise ValueError(
                f"ConvPoolAct: expected a max pool with dilation 1 and no indices, got {pool}"
            )
        self.conv = conv
        self.pool = pool
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.conv.weight.requires_grad):
            y: Tensor = self.act(self.pool(self.conv(x)))
            return y
        p = self.pool
        window = (
            pair(p.kernel_size, "ConvPoolAct", "kernel_size"),
            pair(p.stride, "ConvPoolAct", "stride"),
            pair(p.padding, "ConvPoolAct", "padding"),
            p.ceil_mode,
        )
        N, _, H, W = x.shape
        per_image = self.conv.out_channels * H * W * x.element_size()  # about, before pooling
        # Blocks are for a CPU's caches; a GPU wants the whole batch in one call.
        step = max(1, BLOCK_BYTES // per_image) if x.device.type == "cpu" else N
        pooled = max_pool_no_argmax(self.conv(x[:step]), *window, scratch=True)
        if step < N:
            first = pooled
            pooled = torch.empty(
                (N, *first.shape[1:]),
                dtype=first.dtype,
                device=first.device,
                memory_format=memory_format(first),
            )  # (N, F, H_out, W_out)
            pooled[:step] = first
            for n0 in range(step, N, step):
                block = self.conv(x[n0 : n0 + step])  # (n, F, H_conv, W_conv)
                max_pool_no_argmax(block, *window, scratch=True, out=pooled[n0 : n0 + step])
        out: Tensor = self.act(pooled)  # (N, F, H_out, W_out)
        return out


def conv_pool_act(conv: nn.Module, act: nn.Module, pool: nn.Module) -> ConvPoolAct | None:
    """ConvPoolAct for ``pool(act(conv(x)))`` when the activation allows it, else None."""
    if not (isinstance(conv, Conv2d) and isinstance(pool, MaxPool2d)):
        return None
    if not (nondecreasing(act) and _plain_max_pool(pool)):
        return None
    return ConvPoolAct(conv, pool, act)


def _plain_max_pool(pool: MaxPool2d) -> bool:
    """A max pool ConvPoolAct can run without the argmax: dilation 1, no indices."""
    return pair(pool.dilation, "ConvPoolAct", "dilation") == (1, 1) and not pool.return_indices
