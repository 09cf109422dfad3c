"""Training patches for the detector cascade: positives, part faces, negatives, hard negatives.

Every patch is a square window of a photo resized to the stage's input (12, 24 or 48 px),
labelled by its IoU with the photo's face boxes, as MTCNN does:

    IoU >= 0.65        positive  (face logit 1, box offsets learnt)
    0.4 <= IoU < 0.65  part      (box offsets learnt, no face label: it is neither)
    IoU < 0.3          negative  (face logit 0)
    in between         not used

plus ``POS_NO_BOX`` positives from person-folder crops (aligned faces whose box in WIDER's
convention is only roughly known: they teach "face", not where its edges are).

Windows are cut out with ``crop_windows`` (roi_align with about one sample per source
pixel of a 2x2-averaged halving of the photo: area averaging), the same function the
detector uses at inference, so a training patch
and a detection crop of the same window are the same pixels. Patches are stored as uint8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facetag.data.boxes import FaceBox, iou_matrix
from facetag.vision_ops import roi_align

NEG, POS, PART, POS_NO_BOX = 0, 1, 2, 3
POS_IOU, PART_IOU, NEG_IOU = 0.65, 0.4, 0.3

# Where the face is in aligned crops of the person-folder sets, as (centre x, centre y,
# side) fractions of the crop, measured by eye on a few crops of each (a WIDER-like square
# from the hairline to the chin). The box is only approximate, hence POS_NO_BOX.
FACE_IN_CROP = {
    "lfw": (0.5, 0.52, 0.46),  # 250x250 deep-funneled: the face fills the centre
    "glint_celebs": (0.5, 0.52, 0.86),  # 112x112 ArcFace-aligned: the face fills the crop
    "johns": (0.5, 0.5, 0.68),  # 150x150 dlib chips (the face box plus 25% padding)
}


@dataclass
class PatchSet:
    """images (N, 3, S, S) uint8, labels (N,) int64 in NEG/POS/PART/POS_NO_BOX, offsets (N, 4),
    landmarks (N, 10): each point (x - window x1) / side, (y - y1) / side, NaN where the
    patch's face has no landmarks (and for negatives)."""

    images: Tensor
    labels: Tensor
    offsets: Tensor
    landmarks: Tensor | None = None  # None: no patch has any (filled with NaN)

    def __post_init__(self) -> None:
        if self.landmarks is None:
            self.landmarks = torch.full((self.labels.shape[0], 10), math.nan)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def marks(self) -> Tensor:
        assert self.landmarks is not None  # filled in __post_init__
        return self.landmarks

    def subset(self, idx: Tensor) -> PatchSet:
        return PatchSet(self.images[idx], self.labels[idx], self.offsets[idx], self.marks[idx])

    @staticmethod
    def empty(size: int) -> PatchSet:
        return PatchSet(
            torch.zeros(0, 3, size, size, dtype=torch.uint8),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, 4),
        )

    @staticmethod
    def cat(parts: Sequence[PatchSet]) -> PatchSet:
        return PatchSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.offsets for p in parts]),
            torch.cat([p.marks for p in parts]),
        )

    def counts(self) -> dict[str, int]:
        names = {NEG: "negative", POS: "positive", PART: "part", POS_NO_BOX: "positive_crop"}
        return {name: int((self.labels == k).sum()) for k, name in names.items()}


def halvings(image: Tensor, levels: int = 4) -> list[Tensor]:
    """image (3, H, W) and up to levels - 1 successive 2x2-averaged halvings of it
    (F.avg_pool2d(x, 2): an odd last row or column is dropped).

    Written as two strided sums: F.avg_pool2d took 7 ms for a 1540x1024 photo's three
    halvings (single image, 3 channels: little for its threads to share) where this takes
    under 1. On 0..255 pixels it is bit-identical to it: every sum is of multiples of 4^-k
    below 2^24 * 4^-k, exact in float32, in whatever order they are added.
    """
    out = [image]
    while len(out) < levels and min(out[-1].shape[1:]) >= 2:
        x = out[-1]
        H, W = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
        rows = x[:, 0:H:2] + x[:, 1:H:2]  # (3, H / 2, W)
        out.append((rows[:, :, 0:W:2] + rows[:, :, 1:W:2]).mul_(0.25))  # (3, H / 2, W / 2)
    return out


def crop_windows(image: Tensor | list[Tensor], windows: Tensor, size: int) -> Tensor:
    """Cut square windows out of one image and resize them to size x size.

    image (3, H, W) float pixels, or its ``halvings``; windows (K, 4) x1 y1 x2 y2 in pixels
    of the full image -> (K, 3, size, size) float. Each window is read from the smallest
    halving still at least ``size`` px across it, with roi_align averaging about one sample
    per source pixel there: large windows are area-averaged (no aliasing) at a bounded
    cost. Area outside the image reads as 0 (black), as MTCNN's padding.
    """
    levels = image if isinstance(image, list) else halvings(image)
    C = levels[0].shape[0]
    K = windows.shape[0]
    out = levels[0].new_zeros(K, C, size, size)
    if K == 0:
        return out
    windows = windows.to(levels[0].dtype)
    side = (windows[:, 2] - windows[:, 0]).clamp(min=1.0)
    level = torch.log2(side / size).floor().clamp(0, len(levels) - 1).long()  # (K,)
    for k in torch.unique(level).tolist():
        idx = (level == k).nonzero()[:, 0]
        rois = torch.cat([windows.new_zeros(idx.numel(), 1), windows[idx]], dim=1)  # (k, 5)
        # sampling_ratio=-1: ceil(side / 2^k / size) samples per output pixel and direction
        out[idx] = roi_align(
            levels[k][None], rois, size, spatial_scale=0.5**k, sampling_ratio=-1, aligned=True
        )  # (k, C, size, size)
    return out


def box_offsets(windows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Regression targets: (box - window) / window side, per corner; (K, 4) each -> (K, 4)."""
    side = (windows[:, 2] - windows[:, 0])[:, None]  # (K, 1)
    offsets: np.ndarray = (boxes - windows) / np.maximum(side, 1e-6)
    return offsets


def landmark_targets(windows: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Landmarks (K, 10) in pixels -> in units of each square window (K, 4): the ONet's
    targets, (x - x1) / side and (y - y1) / side (facetag.models.detector.place_landmarks
    undoes it)."""
    side = np.maximum(windows[:, 2] - windows[:, 0], 1e-6)[:, None]  # (K, 1)
    origin = np.tile(windows[:, :2], 5)  # (K, 10)
    targets: np.ndarray = (marks - origin) / side
    return targets


def label_windows(
    windows: np.ndarray, faces: Sequence[FaceBox], neg_iou: float = NEG_IOU
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (K,) in NEG/POS/PART or -1 (unused) and offsets (K, 4) to the best face.

    Invalid faces never yield positives, and a window near any face (invalid or not)
    is no negative.
    """
    labels, offsets, _ = label_windows_marks(windows, faces, neg_iou)
    return labels, offsets


def label_windows_marks(
    windows: np.ndarray, faces: Sequence[FaceBox], neg_iou: float = NEG_IOU
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """label_windows, plus each window's landmark targets (K, 10) from its best face
    (NaN for negatives, unused windows and faces without landmarks)."""
    K = windows.shape[0]
    labels = np.full(K, -1, dtype=np.int64)
    offsets = np.zeros((K, 4), dtype=np.float32)
    marks = np.full((K, 10), np.nan, dtype=np.float32)
    all_boxes = np.array([f.xyxy for f in faces], dtype=np.float64).reshape(-1, 4)
    if all_boxes.shape[0] == 0:
        labels[:] = NEG
        return labels, offsets, marks
    overlaps = iou_matrix(windows, all_boxes)  # (K, G)
    best_any = overlaps.max(axis=1)
    valid = np.array([not f.invalid for f in faces])
    masked = np.where(valid[None, :], overlaps, -1.0)
    j = masked.argmax(axis=1)
    best = masked[np.arange(K), j]
    labels[best_any < neg_iou] = NEG
    labels[(best >= PART_IOU) & (best < POS_IOU)] = PART
    labels[best >= POS_IOU] = POS
    offsets[:] = box_offsets(windows, all_boxes[j]).astype(np.float32)
    offsets[labels == NEG] = 0.0
    face_marks = np.array(
        [f.landmarks if f.landmarks is not None else (np.nan,) * 10 for f in faces], np.float64
    )  # (G, 10)
    marks[:] = landmark_targets(windows, face_marks[j]).astype(np.float32)
    marks[(labels != POS) & (labels != PART)] = np.nan
    return labels, offsets, marks


def random_windows(
    faces: Sequence[FaceBox],
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    min_face: float,
    jitter_per_face: int,
    negatives: int,
    near_negatives_per_face: int,
    min_side: int,
) -> np.ndarray:
    """Square candidate windows (K, 4): jittered around each usable face, near faces, anywhere.

    Usable faces are valid ones at least ``min_face`` px high; jitter follows MTCNN (side
    in [0.8 min(w, h), 1.25 max(w, h)], centre moved by up to 0.2 w and 0.2 h).
    """
    out: list[np.ndarray] = []
    for f in faces:
        if f.invalid or f.h < min_face or f.w < min_face * 0.6:
            continue
        cx, cy = f.x + f.w / 2, f.y + f.h / 2
        n = jitter_per_face
        side = rng.uniform(0.8 * min(f.w, f.h), 1.25 * max(f.w, f.h), n)
        x = cx + rng.uniform(-0.2, 0.2, n) * f.w - side / 2
        y = cy + rng.uniform(-0.2, 0.2, n) * f.h - side / 2
        out.append(np.stack([x, y, x + side, y + side], axis=1))
        m = near_negatives_per_face
        side = rng.uniform(max(min_side, 0.8 * min(f.w, f.h)), 1.5 * max(f.w, f.h) + 1, m)
        x = cx + rng.uniform(-1.2, 1.2, m) * side - side / 2
        y = cy + rng.uniform(-1.2, 1.2, m) * side - side / 2
        out.append(np.stack([x, y, x + side, y + side], axis=1))
    top = max(min(width, height) / 2, min_side + 1)
    # log-uniform sides: as many small windows as large ones, like the pyramid sees them
    side = np.exp(rng.uniform(math.log(min_side), math.log(top), negatives))
    x = rng.uniform(0, 1, negatives) * np.maximum(width - side, 0)
    y = rng.uniform(0, 1, negatives) * np.maximum(height - side, 0)
    out.append(np.stack([x, y, x + side, y + side], axis=1))
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 4))


def patches_from_windows(
    image: Tensor, windows: np.ndarray, faces: Sequence[FaceBox], size: int
) -> PatchSet:
    """Label ``windows`` of ``image`` (3, H, W) by IoU with ``faces``; crop the used ones."""
    labels, offsets, marks = label_windows_marks(windows, faces)
    keep = labels >= 0
    if not keep.any():
        return PatchSet.empty(size)
    crops = crop_windows(image, torch.from_numpy(windows[keep]).float(), size)
    return PatchSet(
        crops.round().clamp(0, 255).to(torch.uint8),
        torch.from_numpy(labels[keep]),
        torch.from_numpy(offsets[keep]),
        torch.from_numpy(marks[keep]),
    )


def balance(patches: PatchSet, rng: np.random.Generator, max_per_label: dict[int, int]) -> PatchSet:
    """At most max_per_label[label] patches of each label (chosen at random)."""
    keep: list[np.ndarray] = []
    labels = patches.labels.numpy()
    for label in (NEG, POS, PART, POS_NO_BOX):
        idx = np.nonzero(labels == label)[0]
        limit = max_per_label.get(label, len(idx))
        if len(idx) > limit:
            idx = rng.choice(idx, limit, replace=False)
        keep.append(idx)
    order = torch.from_numpy(np.sort(np.concatenate(keep)))
    return patches.subset(order)


def crop_positives(
    folders: Iterable[tuple[str, Path]],
    size: int,
    rng: np.random.Generator,
    load: Callable[[Path], Tensor],
    per_folder_limit: int,
    jitter: int = 1,
    teacher: Mapping[Path, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> PatchSet:
    """POS_NO_BOX patches from person-folder sets (name, root folder): a face a photo.

    Up to ``per_folder_limit`` images per set (chosen with rng), ``jitter`` windows each,
    never of the held-out people (LFW N-Z). The face is where ``teacher`` (photo -> (box,
    landmarks), facetag data landmarks) puts it, with landmark targets; a photo without a
    teacher label uses its set's FACE_IN_CROP geometry and has none (other sets: skipped).
    """
    from facetag.data.folders import held_out
    from facetag.data.images import is_image_file

    teacher = teacher or {}
    parts: list[PatchSet] = []
    for name, root in folders:
        files = sorted(
            p for p in root.glob("*/*") if is_image_file(p) and not held_out(root, p.parent.name)
        )
        if len(files) > per_folder_limit:
            files = [files[i] for i in sorted(rng.choice(len(files), per_folder_limit, False))]
        for path in files:
            label = teacher.get(path)
            if label is None and name not in FACE_IN_CROP:
                continue
            image = load(path)  # (3, H, W)
            windows = _face_windows(image, name, label, rng, jitter)  # (jitter, 4)
            marks = np.full((jitter, 10), np.nan)
            if label is not None:
                marks = landmark_targets(windows, np.tile(np.asarray(label[1], float), (jitter, 1)))
            crops = crop_windows(image, torch.from_numpy(windows).float(), size)
            parts.append(
                PatchSet(
                    crops.round().clamp(0, 255).to(torch.uint8),
                    torch.full((jitter,), POS_NO_BOX, dtype=torch.int64),
                    torch.zeros(jitter, 4),
                    torch.from_numpy(marks).float(),
                )
            )
    return PatchSet.cat(parts) if parts else PatchSet.empty(size)


def _face_windows(
    image: Tensor,
    name: str,
    label: tuple[Sequence[float], Sequence[float]] | None,
    rng: np.random.Generator,
    jitter: int,
) -> np.ndarray:
    """``jitter`` square windows (jitter, 4) around a crop's face: the teacher's box when
    there is one, else the set's FACE_IN_CROP geometry; side x0.9-1.1, centre +-5%."""
    H, W = image.shape[1:]
    if label is not None:
        x1, y1, x2, y2 = (float(v) for v in label[0])
        fx, fy, base = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1)
    else:
        rx, ry, fs = FACE_IN_CROP[name]
        fx, fy, base = rx * W, ry * H, fs * min(W, H)
    side = base * rng.uniform(0.9, 1.1, jitter)
    cx = fx + rng.uniform(-0.05, 0.05, jitter) * side
    cy = fy + rng.uniform(-0.05, 0.05, jitter) * side
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], 1)
