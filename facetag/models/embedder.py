"""The face-embedding CNN: conv stages -> pooled features -> L2-normalised embedding.

Built only from facetag.layers. The same code builds the torch.nn twin used by
``facetag bench``: every layer comes from an ``Ops`` namespace, ours by default.

    x (N, C, H, W)
      -> S stages of [conv3x3 (no bias) -> BatchNorm2d + activation -> max-pool 2x2]
                                                          # (N, widths[-1], H/2^S, W/2^S)
      -> global average pool (N, widths[-1]) or flatten  (N, widths[-1] * h * w)
      -> dropout -> Linear -> BatchNorm1d                 # (N, D) the embedding
    classifier (training only): Linear (N, D) -> (N, P) or an ArcFace margin head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from facetag import layers


@dataclass(frozen=True)
class Ops:
    """The layer constructors a network is built from (facetag.layers or a torch twin)."""

    Conv2d: Callable[..., nn.Module]
    BatchNormAct2d: Callable[..., nn.Module]
    MaxPool2d: Callable[..., nn.Module]
    GlobalAvgPool2d: Callable[..., nn.Module]
    Flatten: Callable[..., nn.Module]
    Linear: Callable[..., nn.Module]
    BatchNorm1d: Callable[..., nn.Module]
    Dropout: Callable[..., nn.Module]


OURS = Ops(
    Conv2d=layers.Conv2d,
    BatchNormAct2d=layers.BatchNormAct2d,
    MaxPool2d=layers.MaxPool2d,
    GlobalAvgPool2d=layers.GlobalAvgPool2d,
    Flatten=layers.Flatten,
    Linear=layers.Linear,
    BatchNorm1d=layers.BatchNorm1d,
    Dropout=layers.Dropout,
)


class ConvStage(nn.Module):
    """conv3x3 -> BatchNorm2d + activation -> max-pool 2x2: (N, C, H, W) -> (N, F, H/2, W/2)."""

    def __init__(self, C: int, F: int, activation: str, ops: Ops) -> None:
        super().__init__()
        self.conv = ops.Conv2d(C, F, kernel_size=3, padding=1, bias=False)  # BN has the bias
        self.norm_act = ops.BatchNormAct2d(F, activation=activation)
        self.pool = ops.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.pool(self.norm_act(self.conv(x)))  # (N, F, H/2, W/2)
        return y


class EmbeddingNet(nn.Module):
    """Image batch (N, C, H, W) -> embedding (N, D), not yet L2-normalised.

    ``embed()`` returns the L2-normalised embedding that tagging compares.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128),
        embedding_dim: int = 128,
        activation: str = "prelu",
        dropout: float = 0.0,
        pool: str = "gap",
        image_size: Sequence[int] = (64, 64),
        ops: Ops = OURS,
        flip_average: bool = False,
    ) -> None:
        super().__init__()
        self.flip_average = flip_average
        if not widths:
            raise ValueError("EmbeddingNet: expected at least one stage width, got none")
        stages = []
        C = in_channels
        for F in widths:
            stages.append(ConvStage(C, F, activation, ops))
            C = F
        self.stages = nn.Sequential(*stages)
        if pool == "gap":
            self.pool = ops.GlobalAvgPool2d()
            D_in = C
        elif pool == "flatten":
            # Each stage halves H and W (floor), like MaxPool2d(2).
            h, w = int(image_size[0]), int(image_size[1])
            for _ in widths:
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(
                    f"EmbeddingNet: expected image_size of at least {2 ** len(widths)} px for "
                    f"{len(widths)} stages, got {tuple(image_size)}"
                )
            self.pool = ops.Flatten()
            D_in = C * h * w
        else:
            raise ValueError(f"EmbeddingNet: expected pool 'gap' or 'flatten', got {pool!r}")
        self.dropout = ops.Dropout(dropout)
        self.fc = ops.Linear(D_in, embedding_dim, bias=False)
        self.bn = ops.BatchNorm1d(embedding_dim)
        self.in_channels = in_channels
        self.embedding_dim = embedding_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(x)  # (N, F, h, w)
        x = self.pool(x)  # (N, F) or (N, F * h * w)
        x = self.dropout(x)
        z: Tensor = self.bn(self.fc(x))  # (N, D)
        return z

    def embed(self, x: Tensor) -> Tensor:
        """L2-normalised embeddings (N, D), the ones galleries, tagging and evaluate compare.

        With ``flip_average`` a face and its mirror image are embedded and their
        embeddings summed before normalising: faces are nearly symmetric, so the sum
        keeps what both views agree on and averages out pose and lighting from one side
        (on knn_examples it widened the threshold window from 0.60-0.70 to 0.55-0.75).
        """
        z = self(x)  # (N, D)
        if self.flip_average:
            z = z + self(x.flip(-1))  # (N, D)
        return layers.l2_normalize(z, dim=1)


class FaceClassifier(nn.Module):
    """Embedding net + identity classifier, the training-time model.

    ``forward(x, labels)`` gives logits (N, P). With the ArcFace head the margin applies
    to the labelled class, so labels are needed in training; without labels the head
    returns the scaled cosines (the closed-set prediction).
    """

    def __init__(
        self,
        embedder: nn.Module,  # an EmbeddingNet or a DlibResNet: .embedding_dim, .embed
        num_classes: int,
        head: str = "softmax",
        arcface_scale: float = 30.0,
        arcface_margin: float = 0.5,
        ops: Ops = OURS,
    ) -> None:
        super().__init__()
        self.embedder = embedder
        self.head_kind = head
        D = int(getattr(embedder, "embedding_dim"))  # noqa: B009 (EmbeddingNet or DlibResNet)
        if head == "softmax":
            self.head: nn.Module = ops.Linear(D, num_classes)
        elif head == "arcface":
            self.head = layers.ArcMarginHead(
                D, num_classes, scale=arcface_scale, margin=arcface_margin
            )
        else:
            raise ValueError(f"FaceClassifier: expected head 'softmax' or 'arcface', got {head!r}")

    def forward(self, x: Tensor, labels: Tensor | None = None, with_embedding: bool = False) -> Any:
        """x (N, C, H, W) in [-1, 1] (a dataset batch) -> logits (N, P); with
        ``with_embedding`` also the L2-normalised embedding (N, D) (for distillation)."""
        if getattr(self.embedder, "takes_pixels", False):
            x = (x + 1.0) * 127.5  # a dlib-resnet takes 0..255 chips; data, not in the graph
        z = self.embedder(x)  # (N, D)
        logits: Tensor = self.head(z, labels) if self.head_kind == "arcface" else self.head(z)
        if with_embedding:
            return logits, layers.l2_normalize(z, dim=1)
        return logits  # (N, P)


def training_layout(model: nn.Module, device: str) -> nn.Module:
    """``model`` (an EmbeddingNet or a classifier around one) in the memory layout facetag
    trains it in: channels_last on the CPU, where oneDNN's convolutions and torch's max
    pooling with indices run much faster in (N, H, W, C) than in (N, C, H, W) (the
    benchmark CNN's training step: 414 -> 278 ms, experiments/LOG.md). The weights are
    laid out so; an (N, C, H, W) batch then gives channels_last activations from the first
    conv on (oneDNN follows either operand's layout). Other devices: as it is.

    NOTE: not for the dlib-resnet: with its fused conv + affine its training step was 93
    ms in channels_last against 102 in (N, C, H, W) (batch 16, one pair of runs, within
    the runs' spread) for 1.4x the peak memory (138 against 98 MiB).
    """
    if device != "cpu":
        return model
    return model.to(memory_format=torch.channels_last)
