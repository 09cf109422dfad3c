"""Cut detected faces out of a photo the way the embedder's training crops look.

The embedder learns from face crops (ORL, Yale B, johns, LFW ...) in which the face fills
most of the frame with a little hair, ears and chin around it. A detector box is tighter
(brow to chin), so a face for the embedder is:

    box (x1, y1, x2, y2)
      -> square of side max(w, h) * (1 + margin) around the box centre
      -> the part of that square outside the photo filled with grey 128 (0 after
         normalize, the value training augmentation uses for uncovered corners)
      -> fit_image(crop, image_size, in_channels): the same resize (bilinear, antialiased)
         and grey/colour conversion training used, then normalize() to [-1, 1]

A photo given whole (``box=None``, a face crop already, as with ``--detector none``) goes
straight to fit_image, exactly like a training image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

from facetag.data.images import Photo
from facetag.data.transforms import fit_image, normalize

DEFAULT_MARGIN = 0.25  # square side = (1 + margin) * the box's longer side
FILL = 128  # grey outside the photo


def face_square(box: Sequence[float], margin: float = DEFAULT_MARGIN) -> tuple[int, int, int, int]:
    """The integer square (x1, y1, x2, y2) cropped for ``box``: side (1 + margin) * max(w, h).

    It keeps the box's centre and may reach outside the photo (crop_face pads it).
    """
    if margin < 0:
        raise ValueError(f"face_square: expected margin >= 0, got {margin}")
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(x2 - x1, y2 - y1, 1.0) * (1.0 + margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    s = max(1, round(side))
    return left, top, left + s, top + s


def crop_face(
    img: Image.Image,
    box: Sequence[float] | None,
    image_size: tuple[int, int],
    channels: int,
    margin: float = DEFAULT_MARGIN,
) -> Tensor:
    """One face of a PIL photo -> uint8 (C, H, W) at the embedder's image_size = (H, W).

    ``box`` is in the PIL image's pixels; None takes the whole image as the face.
    """
    if box is None:
        return fit_image(img, image_size, channels)
    return fit_image(square_image(img, box, margin), image_size, channels)


def square_image(
    img: Image.Image, box: Sequence[float], margin: float = DEFAULT_MARGIN
) -> Image.Image:
    """The face_square of ``box`` cut from img (L or RGB), grey FILL outside the photo."""
    x1, y1, x2, y2 = face_square(box, margin)
    W, H = img.size
    mode = "L" if img.mode == "L" else "RGB"
    src = img if img.mode == mode else img.convert(mode)
    fill: int | tuple[int, int, int] = FILL if mode == "L" else (FILL, FILL, FILL)
    square = Image.new(mode, (x2 - x1, y2 - y1), fill)
    # The part of the square inside the photo, pasted at its place in the square.
    ix1, iy1, ix2, iy2 = max(x1, 0), max(y1, 0), min(x2, W), min(y2, H)
    if ix2 > ix1 and iy2 > iy1:
        square.paste(src.crop((ix1, iy1, ix2, iy2)), (ix1 - x1, iy1 - y1))
    return square


def crop_faces(
    img: Image.Image,
    boxes: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    channels: int,
    margin: float = DEFAULT_MARGIN,
) -> Tensor:
    """All faces of one photo: boxes (K, >=4) -> uint8 (K, C, H, W)."""
    H, W = image_size
    if not boxes:
        return torch.zeros((0, channels, H, W), dtype=torch.uint8)
    return torch.stack([crop_face(img, b, image_size, channels, margin) for b in boxes])


@torch.no_grad()
def embed_crops(net: torch.nn.Module, crops: Tensor, batch_size: int, device: str) -> Tensor:
    """uint8 crops (N, C, H, W) -> L2-normalised float32 embeddings (N, D) on the CPU.

    ``net`` is an EmbeddingNet (anything with ``embed``); batches of at most batch_size.
    """
    if crops.ndim != 4 or crops.dtype != torch.uint8:
        raise ValueError(
            f"embed_crops: expected uint8 crops (N, C, H, W), got {crops.dtype} "
            f"of shape {tuple(crops.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"embed_crops: expected batch_size >= 1, got {batch_size}")
    out = []
    for i in range(0, crops.shape[0], batch_size):
        x = normalize(crops[i : i + batch_size]).to(device)  # (B, C, H, W) in [-1, 1]
        out.append(net.embed(x).float().cpu())  # type: ignore[operator]
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)  # (N, D)


class FaceDetector(Protocol):
    """What enrolment and tagging need from a detector (facetag.inference.detect.Detector)."""

    name: str

    @property
    def settings(self) -> Any:  # has max_side: photos are shrunk to it before detection
        ...

    def detect(self, image: Tensor) -> Tensor:  # (3, H, W) 0..255 -> (K, 5) x1 y1 x2 y2 score
        ...


@dataclass(frozen=True)
class WholePhotoSettings:
    max_side: int = 1024  # crops are small; this only bounds a stray large file


@dataclass
class WholePhotoDetector:
    """``--detector none``: every photo is one face crop already (dataset crops, ORL ...).

    The face is the whole photo and goes to fit_image with no margin, like training images.
    """

    name: str = "none"
    settings: WholePhotoSettings = field(default_factory=WholePhotoSettings)
    whole_photo: bool = True

    def detect(self, image: Tensor) -> Tensor:
        """(3, H, W) -> (1, 15): the whole image, score 1, no landmarks (NaN)."""
        _, H, W = image.shape
        return torch.tensor([[0.0, 0.0, float(W), float(H), 1.0] + [math.nan] * 10])


def find_faces(detector: FaceDetector, photo: Photo) -> list[list[float]]:
    """Faces in a photo: [[x1, y1, x2, y2, score, x0, y0, ..., x4, y4]] in the loaded
    pixels, best first (landmarks NaN when the detector has none)."""
    found = detector.detect(photo.chw())  # (K, 15)
    return [[float(v) for v in row] for row in found.tolist()]


def displayed_landmarks(face: Sequence[float], scale: float) -> list[list[float]] | None:
    """A face's five landmarks in displayed pixels [[x, y], ...] (0.1 px), None if it has
    none (a detector without ONet, or --detector none)."""
    marks = list(face[5:15])
    if len(marks) < 10 or any(math.isnan(v) for v in marks):
        return None
    return [[round(marks[2 * i] / scale, 1), round(marks[2 * i + 1] / scale, 1)] for i in range(5)]


def photo_crops(
    detector: FaceDetector,
    photo: Photo,
    faces: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    channels: int,
    margin: float = DEFAULT_MARGIN,
) -> Tensor:
    """The embedder's uint8 crops (K, C, H, W) of ``faces`` (loaded pixels) in ``photo``."""
    img = photo.image()
    if getattr(detector, "whole_photo", False):
        one = crop_face(img, None, image_size, channels)  # (C, H, W)
        return one.unsqueeze(0).repeat(len(faces), 1, 1, 1)  # (K, C, H, W)
    return crop_faces(img, faces, image_size, channels, margin)


def displayed_box(face: Sequence[float], scale: float) -> list[float]:
    """A box in loaded pixels -> [x1, y1, x2, y2] in displayed pixels, 0.1 px precision."""
    return [round(float(v) / scale, 1) for v in face[:4]]
