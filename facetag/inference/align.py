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

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from facetag.data.images import Photo
from facetag.data.transforms import fit_image, normalize
from facetag.models.io import LoadedEmbedder

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

    ``net`` is an EmbeddingNet or a DlibResNet (anything with ``embed``); batches of at
    most batch_size. A net with ``takes_pixels`` (the dlib-resnet) gets the 0..255 pixels
    and normalises them itself; the others get normalize()'s [-1, 1].
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
        batch = crops[i : i + batch_size]  # (B, C, H, W)
        x = (batch if getattr(net, "takes_pixels", False) else normalize(batch)).to(device)
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


def face_json(face: Sequence[float], scale: float) -> dict[str, Any]:
    """What every output says of a detected face: its box and score and, when the detector
    gave them, its landmarks, in displayed pixels (0.1 px)."""
    out: dict[str, Any] = {"box": displayed_box(face, scale), "score": round(float(face[4]), 4)}
    marks = displayed_landmarks(face, scale)
    if marks is not None:
        out["landmarks"] = marks
    return out


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
    embedder: LoadedEmbedder,
    margin: float = DEFAULT_MARGIN,
) -> Tensor:
    """The embedder's uint8 crops (K, C, H, W) of ``faces`` (loaded pixels) in ``photo``:
    aligned chips from the landmarks for an embedder that wants them (the dlib-resnet),
    else squares around the boxes (module doc)."""
    img = photo.image()
    H, W = embedder.image_size
    C = embedder.in_channels
    if getattr(detector, "whole_photo", False):  # the photo is the face (chip) already
        one = crop_face(img, None, embedder.image_size, C)  # (C, H, W)
        return one.unsqueeze(0).repeat(len(faces), 1, 1, 1)  # (K, C, H, W)
    if embedder.aligned:
        if not faces:
            return torch.zeros((0, 3, H, W), dtype=torch.uint8)
        return torch.stack([face_chip(img, face_landmarks(f), H) for f in faces])
    return crop_faces(img, faces, embedder.image_size, C, margin)


def displayed_box(face: Sequence[float], scale: float) -> list[float]:
    """A box in loaded pixels -> [x1, y1, x2, y2] in displayed pixels, 0.1 px precision."""
    return [round(float(v) / scale, 1) for v in face[:4]]


# --- aligned chips (the dlib-resnet embedder) ----------------------------------------------

CHIP_SIZE = 150
# Where the five landmarks (facetag.models.detector.LANDMARKS order) sit in dlib's face
# chip (150 px, padding 0.25), pixel centres: the mean over 2,368 faces of lfw A-M,
# johns, glint_celebs and celeba of MTCNN's points mapped into the chip dlib itself cuts
# (its detector + 5-point predictor + get_face_chip_details), so chips cut from our points
# look like the chips dlib's network was trained on. Measured 2026-12-03, experiments/LOG.md.
CHIP_TEMPLATE = (
    (47.967, 45.867),
    (102.067, 45.775),
    (74.720, 78.656),
    (50.914, 104.426),
    (98.793, 104.345),
)
# Least-squares weights of the points in the fit: dlib aligns on eyes and nose base, so
# eyes and nose carry it; the mouth corners vary with expression (weights found by
# minimising the distance of the dlib descriptors of our chips to those of dlib's chips:
# mean 0.113 against 0.148 with equal weights, on 955 held-out faces).
CHIP_WEIGHTS = (0.4417, 0.4042, 0.1398, 0.0077, 0.0066)
# Landmarks of a face whose detector gives none, as fractions of its box (a WIDER-style
# box, brow to chin): eye centres, nose tip and mouth corners of an average frontal face.
BOX_LANDMARKS = ((0.31, 0.40), (0.69, 0.40), (0.50, 0.60), (0.35, 0.79), (0.65, 0.79))


def similarity(
    src: np.ndarray, dst: np.ndarray, weights: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The similarity (rotation, uniform scale, shift) dst ~ A @ src + t that is best in the
    weighted least-squares sense (Umeyama 1991): src, dst (K, 2) -> A (2, 2), t (2,).

    With means m_s, m_d, centred points s_k, d_k and covariance C = sum w_k d_k s_k^T =
    U D V^T: R = U S V^T (S flips the last axis when det C < 0, so R is no reflection),
    c = trace(D S) / sum w_k |s_k|^2, A = c R, t = m_d - A m_s.
    """
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    ms, md = w @ src, w @ dst
    s0, d0 = src - ms, dst - md
    C = (w[:, None] * d0).T @ s0  # (2, 2)
    U, D, Vt = np.linalg.svd(C)
    S = np.diag([1.0, -1.0 if np.linalg.det(U) * np.linalg.det(Vt) < 0 else 1.0])
    c = float((D * np.diag(S)).sum() / max((w * (s0**2).sum(axis=1)).sum(), 1e-12))
    A = c * (U @ S @ Vt)
    return A, md - A @ ms


def face_chip(img: Image.Image, landmarks: np.ndarray, size: int = CHIP_SIZE) -> Tensor:
    """The aligned chip of one face: uint8 (3, size, size), from its five landmarks (5, 2)
    in ``img``'s pixels (pixel centres), mapped onto CHIP_TEMPLATE by ``similarity``.

    Sampling is Pillow's: when the chip is smaller than the face, the region it needs is
    first shrunk with Pillow's antialiased resize to about the chip's scale, then one
    bilinear affine warp (no sampler of our own). Outside the photo is black, as in dlib.
    """
    k = size / CHIP_SIZE
    template = np.asarray(CHIP_TEMPLATE, np.float64) * k + (k - 1) / 2
    A, t = similarity(np.asarray(landmarks, np.float64), template, CHIP_WEIGHTS)  # image -> chip
    Ai = np.linalg.inv(A)
    ti = -Ai @ t  # chip -> image
    corners = np.array([[-1.0, -1.0], [size, -1.0], [-1.0, size], [size, size]]) @ Ai.T + ti
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 2
    region = img.convert("RGB").crop((int(x0), int(y0), int(x1), int(y1)))  # black outside
    scale = float(np.sqrt(abs(np.linalg.det(A))))  # chip px per image px
    f = 1.0
    if scale < 1.0:  # shrink first, antialiased, then warp at about 1:1
        f = scale
        w, h = max(1, round(region.width * f)), max(1, round(region.height * f))
        region = region.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
        f = w / (x1 - x0)
    # Pillow's AFFINE maps an output pixel's edge coordinates q_e = q + 1/2 to the input's;
    # the chip's pixel centre q is image point Ai q + ti, region point u = that - (x0, y0),
    # whose edge coordinate in the shrunk region is f * (u + 1/2).
    M = f * Ai
    off = f * (ti - np.array([x0, y0]) + 0.5) - M @ np.array([0.5, 0.5])
    coeffs = (M[0, 0], M[0, 1], off[0], M[1, 0], M[1, 1], off[1])
    chip = region.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(chip, dtype=np.uint8).copy()).permute(2, 0, 1)


def face_landmarks(face: Sequence[float]) -> np.ndarray:
    """A detected face's five landmarks (5, 2): the detector's, or BOX_LANDMARKS placed in
    its box when it has none (a cascade without ONet)."""
    marks = np.asarray(face[5:15], np.float64)
    if marks.size == 10 and not np.isnan(marks).any():
        return marks.reshape(5, 2)
    x1, y1, x2, y2 = (float(v) for v in face[:4])
    rel = np.asarray(BOX_LANDMARKS)
    return np.stack([x1 + rel[:, 0] * (x2 - x1), y1 + rel[:, 1] * (y2 - y1)], axis=1)
