"""The face detector: an MTCNN-style cascade of small fully-convolutional nets.

Built only from facetag.layers (Conv2d, BatchNormAct2d, PReLU, MaxPool2d). Each stage
maps an image (or a batch of crops) to a face logit and 4 box offsets per position:

    PNet   12x12 window, stride 2   x (N, 3, H, W)   -> (N, 1 + 4, h, w), h = ceil((H-4)/2) - 3
           conv3x3 F0 -> max-pool 2 -> conv3x3 F1 -> conv3x3 F2 -> conv1x1 1 and 4
    RNet   24x24 crops              x (N, 3, 24, 24) -> (N, 1 + 4, 1, 1)
           conv3x3 F0 -> pool 3/2 -> conv3x3 F1 -> pool 3/2 -> conv2x2 F2 -> conv3x3 F3
           (the "fully connected" layer, as a conv over the whole 3x3 map) -> conv1x1 1 and 4
    ONet   48x48 crops              x (N, 3, 48, 48) -> (N, 1 + 4 + 10, 1, 1)
           conv3x3 F0 -> pool 3/2 -> conv3x3 F1 -> pool 3/2 -> conv3x3 F2 -> pool 2
           -> conv2x2 F3 -> conv3x3 F4 -> conv1x1 1, 4 and 10

Each stage returns a face logit (N, 1, h, w) and 4 box offsets (N, 4, h, w):
(x1' - x1, y1' - y1, x2' - x2, y2' - y2) / side of the square window, so a window
(x1, y1, x2, y2) regresses to the face box inside it. ONet also returns five landmarks
(N, 10, 1, 1) as (x0, y0, ..., x4, y4), each (point - window corner) / side, in the order
of MTCNN, RetinaFace and insightface (LANDMARKS): image-left eye centre, image-right eye
centre, nose tip, image-left mouth corner, image-right mouth corner. Every conv is followed
by batch norm and PReLU (BatchNormAct2d) while training; ``fuse()`` folds each batch norm
into its conv for inference, leaving Conv2d(bias) -> PReLU.

``Detector`` runs a fused cascade over one image (3, H, W):

    pyramid: scales 12/min_face * 0.709^k down to a 12-px image, each run through PNet
    (fully convolutional: one 12x12 window every 2 px) -> windows with face prob > t0,
    NMS 0.5 per scale, NMS 0.7 over all scales, box regression, made square
      -> RNet on the 24x24 crops of those windows -> prob > t1, NMS 0.7, regression, square
      -> ONet (when the model has one) on 48x48 crops -> prob >= threshold, regression
      -> NMS over the final boxes, boxes nested in a better one dropped

NMS and the crops are torchvision's kernels (facetag.vision_ops says how they are loaded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetag.checkpoint import load_checkpoint
from facetag.data.patches import crop_windows, halvings
from facetag.errors import ModelError
from facetag.layers.activation import PReLU
from facetag.layers.conv import Conv2d
from facetag.layers.fused import BatchNormAct2d
from facetag.layers.pool import MaxPool2d
from facetag.models.fold import conv_pool_act
from facetag.models.io import Words, load_weights, shipped_file
from facetag.vision_ops import nms

DETECTOR_FORMAT = "facetag-detector/1"
MAX_CANDIDATES = 2000  # windows kept per pyramid level and per stage (by score)
REFINE_CHUNK = 256  # crops per forward pass of RNet / ONet: bounds the activations' memory
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # image-left first
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
        y: Tensor = self.act(self.conv(x))  # (N, F, H - K + 1, W - K + 1)
        return y

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
        assert bn.weight is not None  # batch norm with affine
        assert bn.bias is not None
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (F,)
        conv = Conv2d(self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size)
        conv.weight.copy_(self.conv.weight * s.view(-1, 1, 1, 1))  # (F, C, K, K)
        assert conv.bias is not None
        conv.bias.copy_(bn.bias - s * bn.running_mean)
        prelu = self.act.act
        assert isinstance(prelu, PReLU)
        prelu_weight = prelu.weight.detach().clone()
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
        self.landmarks: Conv2d | None = Conv2d(W[-1], 10, 1) if kind == "onet" else None
        self.takes_pixels = False  # True after fold_normalization(): 0..255 pixels in

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, 3, H, W) -> (face logits (N, 1, h, w), box offsets (N, 4, h, w))."""
        face, box, _ = self.outputs(x)
        return face, box

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(face logits, box offsets, landmarks (N, 10, h, w) or None for PNet and RNet)."""
        z = self.body(x)  # (N, F, h, w)
        marks = self.landmarks(z) if self.landmarks is not None else None
        return self.face(z), self.box(z), marks

    @torch.no_grad()
    def fold_normalization(self) -> StageNet:
        """Take 0..255 pixels instead of normalize_patches' output (in place; fused nets).

        The first conv is unpadded, so conv(W, (x - 127.5) / 128) + b equals
        conv(W / 128, x) + b - (127.5 / 128) * sum over (c, u, v) of W[f, c, u, v]
        everywhere: the detector then skips two passes over every level and crop.
        """
        if self.takes_pixels:
            return self
        conv = getattr(self.body[0], "conv", None)
        if not isinstance(conv, Conv2d) or conv.bias is None or conv.padding not in (0, (0, 0)):
            raise ValueError(
                f"StageNet.fold_normalization: expected a fused net whose first conv has a "
                f"bias and no padding, got {self.body[0]}; call fuse() first"
            )
        conv.bias.sub_(conv.weight.sum(dim=(1, 2, 3)) * (127.5 / 128.0))
        conv.weight.mul_(1.0 / 128.0)
        self.takes_pixels = True
        return self

    def fuse(self) -> StageNet:
        """Fold every batch norm into its conv (in place, eval mode), and pool before the
        activation where it is non-decreasing (facetag.models.fold.ConvPoolAct); returns
        self."""
        self.eval()
        for m in self.modules():
            if isinstance(m, ConvBlock):
                m.fuse()
        body: list[nn.Module] = []
        for m in self.body:
            fused = None
            if isinstance(m, MaxPool2d) and body and isinstance(body[-1], ConvBlock):
                fused = conv_pool_act(body[-1].conv, body[-1].act, m)
            if fused is not None:
                body[-1] = fused
            else:
                body.append(m)
        self.body = nn.Sequential(*body)
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


@dataclass(frozen=True)
class DetectSettings:
    """How the cascade is run; the model file stores the defaults it was tuned with."""

    min_face: float = 20.0  # smallest face searched for, px high (in the loaded image)
    scale_factor: float = 0.709  # pyramid step: each level is 0.709x the previous one
    stage_thresholds: tuple[float, ...] = (0.6, 0.7)  # PNet, RNet probs (all but the last)
    threshold: float = 0.8  # the last stage's prob: the reported score
    nms_per_scale: float = 0.5  # PNet NMS inside one pyramid level
    nms_stage: float = 0.7  # NMS after each stage
    nms_final: float = 0.4  # NMS on the final boxes: a face is reported once
    nested_final: float = 0.7  # ... and a box this much inside a better one is dropped
    # Larger photos are shrunk to this before detection: a 100-megapixel photo then peaks
    # at ~165 MB above the loaded model (2048 px: ~265 MB, the process going over 0.9 GB).
    max_side: int = 1600
    # ONet passes over each reported face, on a window centred on the face found in the
    # pass before, its mirror image averaged in (Detector.refine_landmarks): the cascade's
    # own landmarks come from the RNet's window, which is off-centre and off-size.
    landmark_rounds: int = 2


@dataclass
class Detector:
    """A loaded, fused cascade and its settings; ``name`` identifies it in outputs."""

    cascade: Cascade
    settings: DetectSettings
    name: str
    device: str = "cpu"
    state: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def detect(
        self, image: Tensor, *, min_face: float | None = None, threshold: float | None = None
    ) -> Tensor:
        """Faces in one image (3, H, W) of 0..255 float pixels -> (K, 15):
        x1 y1 x2 y2 score, then the landmarks x0 y0 ... x4 y4 (NaN without an ONet).

        Boxes and landmarks are in the image's pixels, clipped to it (a landmark outside
        the photo is moved to its edge, the face kept), sorted by decreasing score.
        """
        s = self.settings
        image = image.to(self.device, torch.float32)
        levels = halvings(image) if len(self.cascade.kinds) > 1 else []  # the crops' source
        windows, scores, marks = self.propose(
            image,
            stages=len(self.cascade.kinds),
            min_face=min_face,
            threshold=threshold,
            levels=levels,
        )
        if windows.numel() == 0:
            return torch.zeros(0, 15)
        keep = nms(windows, scores, s.nms_final)
        keep = keep[drop_nested(windows[keep], s.nested_final)]
        boxes, scores, marks = windows[keep], scores[keep], marks[keep]
        if "onet" in self.cascade.kinds and s.landmark_rounds:
            marks = self.refine_landmarks(levels, boxes, s.landmark_rounds)
        H, W = image.shape[1:]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        marks[:, 0::2] = marks[:, 0::2].clamp(0, W)  # NaN stays NaN
        marks[:, 1::2] = marks[:, 1::2].clamp(0, H)
        return torch.cat([boxes, scores[:, None], marks], dim=1).cpu()  # (K, 15)

    @torch.no_grad()
    def propose(
        self,
        image: Tensor,
        stages: int,
        *,
        min_face: float | None = None,
        threshold: float | None = None,
        thresholds: tuple[float, ...] | None = None,
        levels: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the first ``stages`` stages: (boxes (K, 4) regressed, not squared; probs (K,);
        landmarks (K, 10) in image pixels, NaN unless the last stage run is an ONet).

        Training uses this to mine the windows a partly trained cascade gets wrong.
        ``thresholds`` overrides the prob thresholds of the stages run (all of them);
        ``levels``: the image's halvings when the caller has them already.
        """
        s = self.settings
        image = image.to(self.device, torch.float32)
        kinds = self.cascade.kinds[:stages]
        if thresholds is None:
            n = len(self.cascade.kinds)
            last = s.threshold if threshold is None else threshold
            thresholds = (*s.stage_thresholds[: n - 1], last)[:stages]
        boxes, scores = self._pnet(image, min_face or s.min_face, thresholds[0])
        marks = boxes.new_full((boxes.shape[0], 10), math.nan)
        if levels is None:
            levels = halvings(image) if len(kinds) > 1 else []
        for kind, t in zip(kinds[1:], thresholds[1:], strict=True):
            if boxes.numel() == 0:
                break
            boxes, scores, marks = self._refine(levels, self.cascade.stage(kind), square(boxes), t)
        return boxes, scores, marks

    def _pnet(self, image: Tensor, min_face: float, t: float) -> tuple[Tensor, Tensor]:
        pnet = self.cascade.stage("pnet")
        H, W = image.shape[1:]
        s = self.settings
        found_w, found_s, found_r = [], [], []
        scale = 12.0 / min_face  # a min_face-high face becomes PNet's 12-px window
        previous = image[None]  # (1, 3, H, W)
        while min(H, W) * scale >= 12:
            h, w = max(12, math.ceil(H * scale)), max(12, math.ceil(W * scale))
            # Each level is resized from the one before (0.709x), not from the photo: the
            # pyramid then costs about twice its first level rather than once per level.
            x = F.interpolate(
                previous,
                size=(h, w),
                mode="bilinear",
                align_corners=False,
                antialias=h < previous.shape[2],
            )  # (1, 3, h, w)
            previous = x
            logit, offsets = pnet(stage_input(pnet, x))  # (1, 1|4, h', w')
            prob = torch.sigmoid(logit[0, 0])  # (h', w')
            ys, xs = torch.nonzero(prob > t, as_tuple=True)
            if ys.numel():
                score = prob[ys, xs]
                if score.numel() > MAX_CANDIDATES:
                    top = score.topk(MAX_CANDIDATES).indices
                    ys, xs, score = ys[top], xs[top], score[top]
                sx, sy = w / W, h / H
                win = torch.stack(
                    [
                        xs * PNET_STRIDE / sx,
                        ys * PNET_STRIDE / sy,
                        (xs * PNET_STRIDE + 12) / sx,
                        (ys * PNET_STRIDE + 12) / sy,
                    ],
                    dim=1,
                ).float()  # (K, 4) in image pixels
                reg = offsets[0, :, ys, xs].T  # (K, 4)
                keep = nms(win, score, s.nms_per_scale)
                found_w.append(win[keep])
                found_s.append(score[keep])
                found_r.append(reg[keep])
            scale *= s.scale_factor
        if not found_w:
            return image.new_zeros(0, 4), image.new_zeros(0)
        win, score, reg = torch.cat(found_w), torch.cat(found_s), torch.cat(found_r)
        keep = nms(win, score, s.nms_stage)[:MAX_CANDIDATES]
        return regress(win[keep], reg[keep]), score[keep]

    def _refine(
        self, levels: list[Tensor], net: StageNet, windows: Tensor, t: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        probs, regs, marks = [], [], []
        # In chunks: 2000 RNet crops at once would hold ~100 MB of activations.
        for chunk in windows.split(REFINE_CHUNK):
            crops = crop_windows(levels, chunk, net.size)  # (k, 3, S, S)
            logit, offsets, lm = net.outputs(stage_input(net, crops))
            probs.append(torch.sigmoid(logit[:, 0, 0, 0]))  # (k,)
            regs.append(offsets[:, :, 0, 0])  # (k, 4)
            marks.append(
                lm[:, :, 0, 0] if lm is not None else chunk.new_full((chunk.shape[0], 10), math.nan)
            )  # (k, 10)
        prob, reg, mark = torch.cat(probs), torch.cat(regs), torch.cat(marks)
        keep = prob >= t
        windows, prob, reg, mark = windows[keep], prob[keep], reg[keep], mark[keep]
        keep = nms(windows, prob, self.settings.nms_stage)[:MAX_CANDIDATES]
        windows = windows[keep]
        return regress(windows, reg[keep]), prob[keep], place_landmarks(windows, mark[keep])

    def refine_landmarks(self, levels: list[Tensor], boxes: Tensor, rounds: int) -> Tensor:
        """Five landmarks (K, 10) of the faces in ``boxes`` (K, 4), from ``rounds`` more ONet
        passes: each on the square window around the box the pass before regressed (the
        first around ``boxes``), its mirror image run alongside and averaged in.

        Why: the cascade's landmarks are read on the RNet's window, which is off-centre
        and off-size by what the ONet then regresses; on a window centred on the face,
        and averaged with the mirror's (the ONet was trained on flipped patches too), the
        five points land closer (dlib_faces, experiments/LOG.md). The faces themselves
        (boxes, scores) are not changed. ``levels``: the image's halvings.
        """
        onet = self.cascade.stage("onet")
        K = boxes.shape[0]
        marks = boxes.new_full((K, 10), math.nan)
        for _ in range(rounds):
            windows = square(boxes)  # (K, 4)
            crops = crop_windows(levels, windows, onet.size)  # (K, 3, 48, 48)
            _, offsets, lm = onet.outputs(stage_input(onet, torch.cat([crops, crops.flip(3)])))
            assert lm is not None
            offsets, lm = offsets[:, :, 0, 0], lm[:, :, 0, 0]  # (2K, 4), (2K, 10)
            offsets = (offsets[:K] + mirror_offsets(offsets[K:])) / 2
            marks = place_landmarks(windows, (lm[:K] + mirror_landmarks(lm[K:])) / 2)
            boxes = regress(windows, offsets)
        return marks


# A mirrored face swaps its left and right points: (eye, eye, nose, mouth, mouth).
MIRROR = (1, 0, 2, 4, 3)


def mirror_offsets(offsets: Tensor) -> Tensor:
    """Box offsets (K, 4) of a window's mirror image -> the window's own: the new x1 offset
    is -(the old x2 offset), the new x2 offset -(the old x1 offset); y is unchanged."""
    return torch.stack([-offsets[:, 2], offsets[:, 1], -offsets[:, 0], offsets[:, 3]], 1)


def mirror_landmarks(marks: Tensor) -> Tensor:
    """Landmarks (K, 10) in window units of a window's mirror image -> the window's own:
    x -> 1 - x, and the left and right points trade places (MIRROR)."""
    K = marks.shape[0]
    pts = marks.view(K, 5, 2)[:, list(MIRROR)]  # (K, 5, 2)
    return torch.stack([1.0 - pts[..., 0], pts[..., 1]], dim=2).reshape(K, 10)


def drop_nested(boxes: Tensor, limit: float) -> Tensor:
    """Indices of ``boxes`` (K, 4), sorted by decreasing score, to keep: a box is dropped when
    its intersection with a kept box covers more than ``limit`` of the smaller of the two.

    IoU-based NMS keeps a box that lies inside a larger one (an eyes-to-mouth box inside
    the face's box has IoU ~0.4 with it); MTCNN's last NMS uses this "min" overlap too.
    """
    K = boxes.shape[0]
    if K < 2:
        return torch.arange(K)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)  # (K,)
    iw = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp(min=0)
    ih = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp(min=0)
    cover = iw * ih / torch.minimum(area[:, None], area[None]).clamp(min=1e-6)  # (K, K)
    kept: list[int] = []
    for i in range(K):
        if not kept or float(cover[i, kept].max()) <= limit:
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long)


def stage_input(net: StageNet, x: Tensor) -> Tensor:
    """0..255 pixels (N, 3, H, W), uint8 or float -> what ``net`` takes, float32 in
    channels_last: the pixels themselves after fold_normalization, else normalize_patches.

    NOTE: on the CPU, max-pooling (and oneDNN's convolutions) run about 3x faster on
    (N, H, W, C) memory than on (N, C, H, W): measured 7 vs 22 ms for PNet's first pool.
    """
    x = x.float() if net.takes_pixels else normalize_patches(x)
    return x.contiguous(memory_format=torch.channels_last)


def regress(windows: Tensor, offsets: Tensor) -> Tensor:
    """Apply box offsets (K, 4), in units of each window's side, to windows (K, 4)."""
    side = (windows[:, 2] - windows[:, 0])[:, None]  # (K, 1)
    return windows + offsets * side


def place_landmarks(windows: Tensor, marks: Tensor) -> Tensor:
    """Landmarks (K, 10) in units of each square window (K, 4) -> image pixels (K, 10)."""
    side = (windows[:, 2] - windows[:, 0])[:, None]  # (K, 1)
    origin = windows[:, :2].repeat(1, 5)  # (K, 10): x1 y1 x1 y1 ...
    return origin + marks * side


def square(boxes: Tensor) -> Tensor:
    """Boxes (K, 4) -> squares (K, 4) of side max(w, h) with the same centres."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)


def detector_from_state(state: dict[str, Any], name: str, device: str = "cpu") -> Detector:
    """Rebuild a fused, eval-mode Detector from a detector model file's contents."""
    if state.get("format") != DETECTOR_FORMAT:
        raise ModelError(
            f"{name}: expected a facetag detector model (format {DETECTOR_FORMAT}), got "
            f"{state.get('format', 'a checkpoint without a model format')!r}; pass the "
            "detector.pt that facetag train-detector wrote, or a runs:/ or models:/ URI"
        )
    cascade = Cascade(*_cascade_fields(state, name))
    weights = state.get("weights")
    if not isinstance(weights, dict):
        raise _bad(
            name, "weights", "the cascade's weights (a state dict)", Words(type(weights).__name__)
        )
    load_weights(Path(name), cascade, weights, "weights")
    for kind in cascade.kinds:
        cascade.stage(kind).fuse().fold_normalization()
    cascade.to(device).eval()
    settings = _settings(state.get("settings", {}), name)

    return Detector(cascade, settings, name, device, state)


def _bad(name: str, field: str, expected: str, got: object) -> ModelError:
    shown = str(got) if isinstance(got, Words) else repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ModelError(
        f"{name}: expected {field} to be {expected}, got {shown}; pass a detector.pt that "
        "facetag train-detector wrote"
    )


def _cascade_fields(
    state: dict[str, Any], name: str
) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """(widths per stage, stages) of a detector file, checked field by field."""
    stages = state.get("stages")
    valid = [list(STAGE_SIZES)[:n] for n in (1, 2, 3)]
    if stages not in valid:
        raise _bad(name, "stages", "pnet, rnet and optionally onet, in order", stages)
    raw = state.get("widths")
    if not isinstance(raw, dict):
        raise _bad(name, "widths", "channel counts per stage", raw)
    widths: dict[str, tuple[int, ...]] = {}
    for kind in stages:
        w = raw.get(kind, list(DEFAULT_WIDTHS[kind]))
        n = len(DEFAULT_WIDTHS[kind])
        ok = isinstance(w, list | tuple) and len(w) == n
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) for v in w):
            raise _bad(name, f"widths.{kind}", f"{n} channel counts", w)
        if not all(1 <= v <= 1024 for v in w):
            raise _bad(name, f"widths.{kind}", "channel counts in [1, 1024]", w)
        widths[kind] = tuple(w)
    return widths, list(stages)


# Each stored setting's allowed range (inclusive unless noted): a NaN threshold or a
# 0-px face would silently find nothing in every photo.
_SETTING_RANGES: dict[str, tuple[float, float]] = {
    "min_face": (4.0, 10_000.0),
    "landmark_rounds": (0, 5),
    "scale_factor": (0.1, 0.95),
    "threshold": (0.0, 1.0),
    "nms_per_scale": (0.05, 1.0),
    "nms_stage": (0.05, 1.0),
    "nms_final": (0.05, 1.0),
    "nested_final": (0.05, 1.0),
    "max_side": (48, 20_000),
}


def _settings(raw: Any, name: str) -> DetectSettings:
    """The stored DetectSettings, each field checked (unknown keys are ignored: a newer
    facetag may store more)."""
    if not isinstance(raw, dict):
        raise _bad(name, "settings", "a table of detection settings", raw)
    stored: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in DetectSettings.__dataclass_fields__:
            continue
        field = f"settings.{key}"
        if key == "stage_thresholds":
            ok = isinstance(value, list | tuple) and len(value) <= 2
            if not ok or not all(_number_in(v, 0.0, 1.0) for v in value):
                raise _bad(
                    name, field, "probabilities in [0, 1], one per stage but the last", value
                )
            stored[key] = tuple(float(v) for v in value)
            continue
        lo, hi = _SETTING_RANGES[key]
        integer = key in ("max_side", "landmark_rounds")
        if not _number_in(value, lo, hi) or (integer and not isinstance(value, int)):
            kind = "an integer" if integer else "a number"
            raise _bad(name, field, f"{kind} in [{lo:g}, {hi:g}]", value)
        stored[key] = value
    return DetectSettings(**stored)


def _number_in(value: Any, lo: float, hi: float) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and math.isfinite(value) and lo <= value <= hi


def shipped_detector() -> Path:
    """The detector weights inside the package (trained with experiments/configs/detector.toml)."""
    return shipped_file("detector.pt", "reinstall facetag or pass --model")


def load_detector(
    path: Path | None = None, device: str = "cpu", name: str | None = None
) -> Detector:
    """The detector in model file ``path`` (None: the shipped weights), fused, on ``device``.

    ``name`` is how outputs show it (default: the path; for the shipped weights
    ``shipped:<model id>``). runs:/ and models:/ URIs are resolved to a file before this
    (facetag.training.tracking.resolve_model).
    """
    if path is None:
        path = shipped_detector()
        state = load_checkpoint(path)
        return detector_from_state(
            state, name or f"shipped:{state.get('model_id', 'detector')}", device
        )
    return detector_from_state(load_checkpoint(path), name or str(path), device)
