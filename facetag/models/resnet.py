"""dlib's face metric network (``dlib_face_recognition_resnet_model_v1``) on facetag.layers.

The topology of ``anet_type`` in dlib's examples/dnn_face_recognition_ex.cpp (and of the
network inside dlib's Python ``face_recognition_model_v1``), layer for layer, so that
dlib's trained weights (facetag.models.dlib_import) give the descriptors dlib gives:

    chips (N, 3, 150, 150) RGB, 0..255
      -> (x - [122.782, 117.001, 104.298]) / 256      dlib's input_rgb_image_sized
      -> conv 7x7/2, 32, no padding -> affine -> relu  (N, 32, 72, 72)
      -> max-pool 3x3/2                                 (N, 32, 35, 35)
      -> 3 residual blocks of 32                        (N, 32, 35, 35)
      -> down block 64, 3 blocks of 64                  (N, 64, 17, 17)
      -> down block 128, 2 blocks of 128                (N, 128, 8, 8)
      -> down block 256, 2 blocks of 256                (N, 256, 4, 4)
      -> down block 256                                 (N, 256, 2, 2)
      -> global average pool                            (N, 256)
      -> fully connected 256 -> 128, no bias            (N, 128) the descriptor

A residual block (dlib's ``ares``) is relu(x + affine(conv3x3(relu(affine(conv3x3(x)))))),
every conv with a bias (dlib's ``con``) and padded by 1. A down block (``ares_down``) has
a stride-2 first conv and a 2x2 stride-2 average-pooled skip, added by dlib's add_prev
(facetag.layers.zero_pad_add): dlib pads a conv by K//2 only at stride 1, so the stride-2
conv is unpadded, H_out = (H - 3) // 2 + 1, while the pool gives H_out = (H - 2) // 2 + 1.
At 35 and 17 px the two agree (17, 8) and only the skip's missing channels are zero; at
8 px the conv gives 3x3 and the pool 4x4, so the sum is 4x4 with the main path in its
top-left 3x3 corner, and at 4 px the conv gives 1x1 and the pool 2x2. 29 convolutions,
each followed by an affine (dlib's stand-in for batch norm at inference).

The descriptor is dlib's raw output: dlib does NOT L2-normalise it (loss_metric's
to_label copies the fc output), and its 0.6 threshold is a Euclidean distance between raw
descriptors, whose norms are 1.27-1.56 on real faces (median 1.42), not 1. ``embed``
returns the L2-normalised form facetag's galleries compare by cosine distance. For unit
vectors ||a - b||^2 = 2 * (1 - cos(a, b)), so a Euclidean 0.6 between UNIT vectors would
be a cosine distance of 0.18; between raw descriptors of norm ~1.42 it is
1 - cos = 0.6^2 / (2 * 1.42^2) ~ 0.09 (on dlib's johns set: same-person pairs reach 0.073,
different people start at 0.109). Calibrate the cosine threshold; do not carry 0.6 over.

``folded()`` gives the inference copy: each affine folded into its conv (weight * gamma,
bias * gamma + beta), one pass less per conv, in channels_last (faster on CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from facetag import layers
from facetag.models.fold import conv_pool_act

ARCHITECTURE = "dlib-resnet"
CHIP_SIZE = 150
EMBEDDING_DIM = 128
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)  # input_rgb_image_sized's avg_red/green/blue
DLIB_INPUT_SCALE = 256.0  # ... which divides by 256, not 255 or the std
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
"""(filters, blocks, whether the first block is a down block), input side first."""


class ConvAffine(nn.Module):
    """conv (with bias) -> per-channel affine (one fused op), or after ``fold_()`` the conv
    alone.

    x (N, C, H, W) -> (N, F, H_out, W_out), H_out = (H + 2*padding - K) // stride + 1.
    """

    def __init__(self, C: int, F: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = layers.Conv2d(C, F, kernel_size, stride=stride, padding=padding)
        self.affine: nn.Module = layers.ChannelAffine(F)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv
        if isinstance(self.affine, layers.ChannelAffine):  # one op (layers.conv_affine)
            return layers.conv_affine(
                x,
                conv.weight,
                conv.bias,
                self.affine.gamma,
                self.affine.beta,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            )  # (N, F, H_out, W_out)
        y: Tensor = self.affine(conv(x))  # folded: the conv alone
        return y

    @torch.no_grad()
    def fold_(self) -> None:
        """(conv(x) + b) * gamma + beta == conv with weight W * gamma[f], bias b * gamma + beta."""
        if not isinstance(self.affine, layers.ChannelAffine):
            return  # already folded
        gamma, beta = self.affine.gamma, self.affine.beta
        conv = self.conv
        conv.weight.mul_(gamma.view(-1, 1, 1, 1))
        bias = beta.clone() if conv.bias is None else conv.bias * gamma + beta
        conv.bias = nn.Parameter(bias)
        self.affine = nn.Identity()  # no autograd node: returns its input


class ResidualBlock(nn.Module):
    """dlib's ares (stride 1, identity skip) or ares_down (stride 2, average-pooled skip).

    x (N, C, H, W) -> (N, F, H, W), or for a down block (N, F, H', W') with
    H' = max((H - 3) // 2 + 1, (H - 2) // 2 + 1) (the larger of the conv and the pool).
    """

    def __init__(self, C: int, F: int, down: bool) -> None:
        super().__init__()
        self.down = down
        stride, padding = (2, 0) if down else (1, 1)  # dlib's con: padding K//2 at stride 1
        self.conv1 = ConvAffine(C, F, 3, stride, padding)
        self.relu1 = layers.ReLU(inplace=True)
        self.conv2 = ConvAffine(F, F, 3, 1, 1)
        self.skip_pool = layers.AvgPool2d(2, 2) if down else None
        self.relu = layers.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.relu1(self.conv1(x)))  # (N, F, H_conv, W_conv)
        if self.skip_pool is None:
            out: Tensor = self.relu(layers.add(y, x))  # (N, F, H, W)
        else:
            skip = self.skip_pool(x)  # (N, C, H_pool, W_pool)
            out = self.relu(layers.zero_pad_add(y, skip))  # (N, F, max H, max W)
        return out


class DlibResNet(nn.Module):
    """150x150 RGB chips (N, 3, 150, 150), uint8 or float 0..255 -> descriptors (N, 128).

    The chips are cut as dlib.get_face_chip cuts them (5 landmarks, padding 0.25).
    ``channels_last`` lays the conv weights out (F, KH, KW, C), which makes every
    activation channels_last: faster on CPU (oneDNN's native layout).
    """

    input_scale: Tensor  # (3,) buffers: 1/256, and -mean/256
    input_shift: Tensor
    architecture = ARCHITECTURE
    in_channels = 3
    image_size = (CHIP_SIZE, CHIP_SIZE)
    embedding_dim = EMBEDDING_DIM

    takes_pixels = True  # embed() takes 0..255 chips and normalises them as dlib does

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        # (x - mean) / 256 as x * (1/256) + (-mean/256): both factors are exact in float32
        # (a power of two), so this rounds exactly where dlib's (x - mean) / 256.0 does.
        mean = torch.tensor(DLIB_MEAN_RGB, dtype=torch.float32)
        self.register_buffer("input_scale", torch.full((3,), 1.0 / DLIB_INPUT_SCALE))
        self.register_buffer("input_shift", -mean / DLIB_INPUT_SCALE)
        # nn.Module: folded() makes them one ConvPoolAct and two nn.Identity
        self.stem: nn.Module = ConvAffine(3, 32, 7, stride=2, padding=0)
        self.stem_relu: nn.Module = layers.ReLU(inplace=True)
        self.stem_pool: nn.Module = layers.MaxPool2d(3, 2)
        blocks = []
        C = 32
        for F, n, down in STAGES:
            for i in range(n):
                blocks.append(ResidualBlock(C, F, down=down and i == 0))
                C = F
        self.blocks = nn.Sequential(*blocks)
        self.pool = layers.GlobalAvgPool2d()
        self.fc = layers.Linear(C, EMBEDDING_DIM, bias=False)
        if channels_last:  # conv weights (F, C, K, K) laid out (F, K, K, C): see normalize
            self.to(memory_format=torch.channels_last)

    def normalize(self, chips: Tensor) -> Tensor:
        """uint8 or float 0..255 chips (N, 3, 150, 150) -> dlib's input tensor, float32."""
        if chips.ndim != 4 or chips.shape[1:] != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(
                f"DlibResNet: expected chips of shape (N, 3, {CHIP_SIZE}, {CHIP_SIZE}), got "
                f"{tuple(chips.shape)}; cut them with dlib.get_face_chip(img, shape, "
                f"size={CHIP_SIZE}, padding=0.25)"
            )
        # NOTE: plain (N, C, H, W) order, whatever the chips' strides (an (N, H, W, C)
        # array permuted is channels_last): the 3-channel affine broadcasts twice as fast
        # there, and the stem conv reads it faster too; with channels_last weights its
        # output is channels_last all the same (oneDNN follows either operand's layout).
        x = torch.empty(chips.shape, dtype=self.input_scale.dtype, device=chips.device)
        x.copy_(chips)  # (N, 3, 150, 150): uint8 -> float and any transpose, one pass
        return layers.channel_affine(x, self.input_scale, self.input_shift)

    def forward(self, chips: Tensor) -> Tensor:
        x = self.normalize(chips)  # (N, 3, 150, 150)
        x = self.stem_pool(self.stem_relu(self.stem(x)))  # (N, 32, 35, 35)
        x = self.blocks(x)  # (N, 256, 2, 2)
        descriptors: Tensor = self.fc(self.pool(x))  # (N, 128)
        return descriptors

    def embed(self, chips: Tensor) -> Tensor:
        """L2-normalised descriptors (N, 128), what galleries compare by cosine distance."""
        return layers.l2_normalize(self(chips), dim=1)

    def folded(self, channels_last: bool = True) -> DlibResNet:
        """An eval-mode copy with every affine folded into its conv; this net is unchanged.

        Outputs match the unfolded net to float32 rounding (~1e-6 relative).
        """
        net = copy.deepcopy(self).eval()
        for module in net.modules():
            if isinstance(module, ConvAffine):
                module.fold_()
        # pool, then relu on the 35x35 map rather than the 72x72 one (a folded net's
        # stem is a ConvPoolAct already)
        if isinstance(net.stem, ConvAffine):
            stem = conv_pool_act(net.stem.conv, net.stem_relu, net.stem_pool)
            if stem is not None:
                net.stem, net.stem_relu, net.stem_pool = stem, nn.Identity(), nn.Identity()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        return net.to(memory_format=layout)


def conv_layers(net: nn.Module) -> list[layers.Conv2d]:
    """Every convolution of ``net``, input side first."""
    return [m for m in net.modules() if isinstance(m, layers.Conv2d)]


def count_macs(net: DlibResNet) -> int:
    """Multiply-accumulates of one chip through ``net``: convs and the fc layer.

    A conv costs H_out * W_out * F * C * KH * KW; pooling, affines and additions are not
    counted (they are a few per output element, against hundreds per conv output).
    """
    sizes: dict[int, tuple[int, int]] = {}

    def record(module: nn.Module, _inputs: object, out: Tensor) -> None:
        conv = module.conv if isinstance(module, ConvAffine) else module  # a fused pair's conv
        sizes[id(conv)] = (out.shape[2], out.shape[3])

    convs = conv_layers(net)
    fused = [m for m in net.modules() if isinstance(m, ConvAffine)]
    hooks = [m.register_forward_hook(record) for m in [*convs, *fused]]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, CHIP_SIZE, CHIP_SIZE))
    finally:
        for h in hooks:
            h.remove()
    macs = net.fc.weight.numel()
    for c in convs:
        H, W = sizes[id(c)]
        macs += H * W * c.weight.numel()
    return macs
