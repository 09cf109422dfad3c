"""The torch.nn twin of facetag.models.resnet.DlibResNet, for ``facetag bench --model resnet``.

The same topology written the way a PyTorch user writes it: nn.Conv2d, nn.ReLU,
nn.MaxPool2d, nn.AvgPool2d, nn.Linear, and plain tensor expressions where torch.nn has no
module (dlib's per-channel affine, the zero-padded residual sum of add_prev). Module and
parameter names are DlibResNet's, so ``twin.load_state_dict(ours.state_dict())`` gives
the twin our weights, and autograd differentiates it (the reference, never our layers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from facetag.models.resnet import CHIP_SIZE, DLIB_INPUT_SCALE, DLIB_MEAN_RGB, EMBEDDING_DIM, STAGES


class TwinAffine(nn.Module):
    """dlib's affine layer: x (N, C, H, W) * gamma[c] + beta[c] (ChannelAffine's twin)."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(C))
        self.beta = nn.Parameter(torch.zeros(C))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)  # (N, C, H, W)


class TwinConvAffine(nn.Module):
    """nn.Conv2d (with bias) -> affine: (N, C, H, W) -> (N, F, H_out, W_out)."""

    def __init__(self, C: int, F_: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, F_, kernel_size, stride=stride, padding=padding)
        self.affine = TwinAffine(F_)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.affine(self.conv(x))  # (N, F, H_out, W_out)
        return y


def twin_zero_pad_add(x: Tensor, skip: Tensor) -> Tensor:
    """dlib's add_prev in torch: both zero-padded at the end of C, H, W to the larger size."""
    C, H, W = (max(a, b) for a, b in zip(x.shape[1:], skip.shape[1:], strict=True))

    def pad(t: Tensor) -> Tensor:
        return F.pad(t, (0, W - t.shape[3], 0, H - t.shape[2], 0, C - t.shape[1]))

    return pad(x) + pad(skip)  # (N, C, H, W)


class TwinResidualBlock(nn.Module):
    """ResidualBlock's twin: (N, C, H, W) -> (N, F, H', W')."""

    def __init__(self, C: int, F_: int, down: bool) -> None:
        super().__init__()
        stride, padding = (2, 0) if down else (1, 1)
        self.conv1 = TwinConvAffine(C, F_, 3, stride, padding)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = TwinConvAffine(F_, F_, 3, 1, 1)
        self.skip_pool = nn.AvgPool2d(2, 2) if down else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.relu1(self.conv1(x)))  # (N, F, H_conv, W_conv)
        if self.skip_pool is None:
            out: Tensor = self.relu(y + x)  # (N, F, H, W)
        else:
            out = self.relu(twin_zero_pad_add(y, self.skip_pool(x)))  # (N, F, max H, max W)
        return out


class TwinDlibResNet(nn.Module):
    """DlibResNet's twin: chips (N, 3, 150, 150), 0..255 -> descriptors (N, 128)."""

    input_scale: Tensor
    input_shift: Tensor
    embedding_dim = EMBEDDING_DIM
    takes_pixels = True  # FaceClassifier maps its [-1, 1] batch to 0..255 first, as for ours

    def __init__(self) -> None:
        super().__init__()
        mean = torch.tensor(DLIB_MEAN_RGB, dtype=torch.float32)
        self.register_buffer("input_scale", torch.full((3,), 1.0 / DLIB_INPUT_SCALE))
        self.register_buffer("input_shift", -mean / DLIB_INPUT_SCALE)
        self.stem = TwinConvAffine(3, 32, 7, stride=2, padding=0)
        self.stem_relu = nn.ReLU(inplace=True)
        self.stem_pool = nn.MaxPool2d(3, 2)
        blocks = []
        C = 32
        for F_, n, down in STAGES:
            for i in range(n):
                blocks.append(TwinResidualBlock(C, F_, down=down and i == 0))
                C = F_
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(C, EMBEDDING_DIM, bias=False)

    def forward(self, chips: Tensor) -> Tensor:
        x = chips.float() * self.input_scale.view(1, 3, 1, 1) + self.input_shift.view(1, 3, 1, 1)
        x = self.stem_pool(self.stem_relu(self.stem(x)))  # (N, 32, 35, 35)
        x = self.blocks(x)  # (N, 256, 2, 2)
        descriptors: Tensor = self.fc(x.mean((2, 3)))  # (N, 128)
        return descriptors


__all__ = ["CHIP_SIZE", "TwinDlibResNet", "twin_zero_pad_add"]
