"""The face detector: an MTCNN-style cascade of small fully-convolutional nets.

Built only from facetag.layers (Conv2d, BatchNormAct2d, PReLU, MaxPool2d). Each stage
maps an image (or a batch of crops) to a face logit and 4 box offsets per position:

    PNet   12x12 window, stride 2   x (N, 3, H, W)   -> (N, 1 + 4, h, w), h = ceil((H-4)/2) - 3
           conv3x3 F0 -> max-pool 2 -> conv3x3 F1 -> conv3x3 F2 -> conv1x1 1 and 4
    RNet   24x24 crops              x (N, 3, 24, 24) -> (N, 1 + 4, 1, 1)
           conv3x3 F0 -> pool 3/2 -> conv3x3 F1 -> pool 3/2 -> conv2x2 F2 -> conv3x3 F3
           (the "fully connected" layer, as a conv over the whole 3x3 map) -> conv1x1 1 and 4
    ONet   48x48 crops              x (N, 3, 48, 48) -> (N, 1 + 4, 1, 1)
           conv3x3 F0 -> pool 3/2 -> conv3x3 F1 -> pool 3/2 -> conv3x3 F2 -> pool 2
           -> conv2x2 F3 -> conv3x3 F4 -> conv1x1 1 and 4

Each stage returns a face logit (N, 1, h, w) and 4 box offsets (N, 4, h, w):
(x1' - x1, y1' - y1, x2' - x2, y2' - y2) / side of the square window, so a window
(x1, y1, x2, y2) regresses to the face box inside it. Every conv is followed by batch norm
and PReLU (BatchNormAct2d) while training; ``fuse()`` folds each batch norm into its conv
for inference, leaving Conv2d(bias) -> PReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from facetag.layers.activation import PReLU
from facetag.layers.conv import Conv2d
from facetag.layers.fused import BatchNormAct2d
from facetag.layers.pool import MaxPool2d

STAGE_SIZES = {"pnet": 12, "rnet": 24, "onet": 48}  # input window of each stage
PNET_STRIDE = 2  # one PNet output per 2 input pixels (its one max-pool)
DEFAULT_WIDTHS: dict[str, tuple[int, ...]] = {
    "pnet": (10, 16, 32),
    "rnet": (28, 48, 64, 128),
    "onet": (32, 64, 64, 128, 256),
}


class ConvBlock(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d + PReLU; after ``fuse()``: Conv2d (bias) -> PReLU."""

    def __init__(self, C: int, F: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = Conv2d(C, F, kernel_size, bias=False)  # the batch norm holds the shift
        self.act: nn.Module = BatchNormAct2d(F, activation="prelu", use_compile=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))  # (N, F, H - K + 1, W - K + 1)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the batch norm's running statistics into the conv (eval-mode maths).

        bn(conv(x)) = gamma * (W*x - mean) / sqrt(var + eps) + beta
                    = (s * W) * x + (beta - s * mean),   s = gamma / sqrt(var + eps)
        """
        if not isinstance(self.act, BatchNormAct2d):
            return
        bn = self.act.bn
        assert bn.running_mean is not None
        assert bn.running_var is not None
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (F,)
        conv = Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size)
        conv.weight.copy_(self.conv.weight * s.view(-1, 1, 1, 1))  # (F, C, K, K)
        conv.bias.copy_(bn.bias - s * bn.running_mean)  # type: ignore[union-attr]
        prelu_weight = self.act.act.weight.detach().clone()
        act = PReLU(prelu_weight.numel())
        act.weight.copy_(prelu_weight)
        self.conv = conv.to(self.conv.weight.device)
        self.act = act.to(self.conv.weight.device)


class StageNet(nn.Module):
    """One cascade stage: ``kind`` in pnet, rnet, onet; x (N, 3, H, W) -> logits, offsets."""

    def __init__(self, kind: str, widths: Sequence[int] | None = None) -> None:
        super().__init__()
        if kind not in STAGE_SIZES:
            raise ValueError(f"StageNet: expected kind in {sorted(STAGE_SIZES)}, got {kind!r}")
        widths = tuple(widths or DEFAULT_WIDTHS[kind])
        if len(widths) != len(DEFAULT_WIDTHS[kind]) or min(widths) < 1:
            raise ValueError(
                f"StageNet: expected {len(DEFAULT_WIDTHS[kind])} widths >= 1 for {kind}, "
                f"got {widths}"
            )
        self.kind = kind
        self.size = STAGE_SIZES[kind]
        self.widths = widths
        W = widths
        layers: list[nn.Module]
        if kind == "pnet":  # 12 -> 10 -> 5 -> 3 -> 1
            layers = [
                ConvBlock(3, W[0], 3),
                MaxPool2d(2, 2, ceil_mode=True),
                ConvBlock(W[0], W[1], 3),
                ConvBlock(W[1], W[2], 3),
            ]
        elif kind == "rnet":  # 24 -> 22 -> 11 -> 9 -> 4 -> 3 -> 1
            layers = [
                ConvBlock(3, W[0], 3),
                MaxPool2d(3, 2, ceil_mode=True),
                ConvBlock(W[0], W[1], 3),
                MaxPool2d(3, 2, ceil_mode=True),
                ConvBlock(W[1], W[2], 2),
                ConvBlock(W[2], W[3], 3),
            ]
        else:  # 48 -> 46 -> 23 -> 21 -> 10 -> 8 -> 4 -> 3 -> 1
            layers = [
                ConvBlock(3, W[0], 3),
                MaxPool2d(3, 2, ceil_mode=True),
                ConvBlock(W[0], W[1], 3),
                MaxPool2d(3, 2, ceil_mode=True),
                ConvBlock(W[1], W[2], 3),
                MaxPool2d(2, 2, ceil_mode=True),
                ConvBlock(W[2], W[3], 2),
                ConvBlock(W[3], W[4], 3),
            ]
        self.body = nn.Sequential(*layers)
        # Two 1x1 heads rather than one with 5 channels: the losses then take each output
        # as it is, with no slicing node (a built-in autograd op) in the training graph.
        self.face = Conv2d(W[-1], 1, 1)  # face logit
        self.box = Conv2d(W[-1], 4, 1)  # box offsets

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, 3, H, W) -> (face logits (N, 1, h, w), box offsets (N, 4, h, w))."""
        z = self.body(x)  # (N, F, h, w)
        return self.face(z), self.box(z)

    def fuse(self) -> StageNet:
        """Fold every batch norm into its conv (in place, eval mode); returns self."""
        self.eval()
        for m in self.modules():
            if isinstance(m, ConvBlock):
                m.fuse()
        return self


def normalize_patches(x: Tensor) -> Tensor:
    """uint8 or 0..255 float pixels (N, 3, H, W) -> float (x - 127.5) / 128, as MTCNN."""
    return (x.float() - 127.5) * (1.0 / 128.0)


class Cascade(nn.Module):
    """The stages of one detector, in order (pnet, then rnet, then onet if present)."""

    def __init__(self, widths: dict[str, tuple[int, ...]], stages: Sequence[str]) -> None:
        super().__init__()
        order = [k for k in STAGE_SIZES if k in stages]
        if not order or order[0] != "pnet" or len(order) != len(stages):
            raise ValueError(
                f"Cascade: expected stages starting with 'pnet' from {list(STAGE_SIZES)}, "
                f"got {list(stages)}"
            )
        self.stages = nn.ModuleDict({k: StageNet(k, widths.get(k)) for k in order})

    def stage(self, kind: str) -> StageNet:
        net = self.stages[kind]
        assert isinstance(net, StageNet)
        return net

    @property
    def kinds(self) -> list[str]:
        return list(self.stages.keys())
